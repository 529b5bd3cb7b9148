"""Answer extraction and accuracy, the way lm-evaluation-harness scores GSM8k.

Two extractions per generation, both reported (STYLE.md, lm-eval section):
- strict: the first number after the LAST ``answer_prompt`` ("The answer is:"). A text without the prompt
  is taken to be the answer segment itself (latent and no-CoT generations are just ``" 18<eos>"`` after
  the prompt), so strict is its first number; pass ``require_prompt=True`` to make such a text invalid.
- flexible: the last number anywhere in the text.
A text with no number gives None, which counts as wrong: nothing is skipped.

Numbers: ``1,234`` (thousands groups of exactly three; ``1,5`` or ``12,34`` is one malformed number, as for
the gold answers: `kava.data.readers.normalize_number`), ``$18.00``, ``-3``, ``18.`` (the period ends the
sentence), ``.5``, ``0.5``, ``1e3`` and ``2.0107e-06`` (scientific notation is accepted because GSM-Hard
answers come from Python floats and models that imitate them print it), ``50%`` (-> 50), and a simple
fraction ``3/4`` (-> 0.75, the decimal the readers store for a gold ``#### 3/4``; ``1/3``, which has no exact
decimal, is one malformed number, as such a gold is no number). A minus sign counts only when it does not
follow a word character, so ``5-3`` reads as 5 and 3 and ``pages 10-12`` ends with 12, not -12.

Digit-string answers (``Record.answer_kind == "digits"``, iCoT's multiplication): the answer is the run of digits
(single digits separated by whitespace, or adjacent) after the last answer prompt, flexible the last such run
in the text; it matches when its digit sequence equals the gold's exactly (``0 0 6`` is not ``6``, and a longer
run is wrong). No number normalisation touches them.

Matching (`numbers_match`): an integer gold needs the exact value (``18.00`` matches ``18``); a relative
tolerance would accept 9867631 for GSM-Hard's 9867630. A non-integer gold (GSM-Hard) allows
``max(abs_tol, rel_tol*|gold|)`` for float noise and modest rounding, capped at ``max_tol`` so that a
large answer that is off by a cent or more is still wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from kava.data.readers import ANSWER_PROMPT, THOUSANDS_RE
from kava.data.readers import normalize_number as canonical_number
from kava.data.records import Record

# sign (not after a word char) | optional "$ " | a simple fraction, or digits with commas or plain digits,
# optional decimals | or .5 | exponent. Digits joined by commas are read as one token: 1,234 is a number, 1,5 is
# one malformed number (None, as `normalize_number` says of a gold 1,5), never 1 followed by 5. A fraction is
# one token too, read as the reader reads a gold one (3/4 -> 0.75, 1/3 -> None); a date 12/25/2020 is not one.
_FRACTION = r"(?<![\d/])\d+/\d+(?![\d/])"
_DIGITS = r"(?:\d+(?:,\d+)+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_RE = re.compile(rf"(?:(?<![\w.])-)?(?:\$\s?)?(?:{_FRACTION}|{_DIGITS})(?:[eE][-+]?\d+)?")


# ----------------------------------------------------------------------------------------------------
# filters: tiny named steps applied in order to a matched number (lm-eval style)


def strip_whitespace(s: str) -> str:
    return "".join(s.split())


def strip_dollar(s: str) -> str:
    return s.replace("$", "")


def strip_commas(s: str) -> str:
    """Thousands separators only (``2,125``); other commas stay, and the number is then invalid."""
    return s.replace(",", "") if THOUSANDS_RE.fullmatch(s) else s


def strip_trailing_period(s: str) -> str:
    return s.rstrip(".")


FILTERS: tuple[Callable[[str], str], ...] = (strip_whitespace, strip_dollar, strip_commas, strip_trailing_period)


def clean_number(text: str) -> str | None:
    """Run the filters, then the canonical form the readers give gold answers (``"18.00"`` -> ``"18"``,
    ``"1e3"`` -> ``"1000"``), so that predictions and gold compare as equal strings; None if not a number."""
    for f in FILTERS:
        text = f(text)
    return canonical_number(text)


def number_tokens(text: str) -> list[str | None]:
    """Every number-like token of `text`, cleaned, in order; None for a malformed one (``1,5``)."""
    return [clean_number(m.group(0)) for m in NUMBER_RE.finditer(text)]


def find_numbers(text: str) -> list[str]:
    """All numbers in `text`, cleaned, in order (malformed ones left out)."""
    return [n for n in number_tokens(text) if n is not None]


def extract_answer(text: str, answer_prompt: str = ANSWER_PROMPT, require_prompt: bool = False) -> dict[str, str | None]:
    """``{"strict": first number after the last answer prompt (or of the bare answer segment),
    "flexible": last number in the text}``; either is None when there is no such number, and strict is None
    when that first number is malformed (`` 1,5``: neither 1 nor 15)."""
    nums = find_numbers(text)
    flexible = nums[-1] if nums else None
    at = text.rfind(answer_prompt) if answer_prompt else -1
    if at >= 0:
        after = number_tokens(text[at + len(answer_prompt):])
        strict = after[0] if after else None
    else:
        first = number_tokens(text)
        strict = None if require_prompt else (first[0] if first else None)
    return {"strict": strict, "flexible": flexible}


def _decimal(s: str | None) -> Decimal | None:
    if s is None:
        return None
    try:
        d = Decimal(s.strip().replace(",", ""))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def numbers_match(pred: str | None, gold: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6, max_tol: float = 0.01) -> bool:
    """Whether a predicted number equals the gold answer (see the module docstring for the tolerance rule)."""
    p, g = _decimal(pred), _decimal(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    if g == g.to_integral_value():
        return False
    tol = min(max(abs_tol, rel_tol * abs(float(g))), max_tol)
    return abs(float(p) - float(g)) <= tol


# ----------------------------------------------------------------------------------------------------
# answer kinds: numbers (GSM8k and the like) and digit strings (multiplication)

ANSWER_KINDS = ("number", "digits")
DIGIT_RUN_RE = re.compile(r"\d(?:\s*\d)*")


def extract_digits(text: str, answer_prompt: str = ANSWER_PROMPT, require_prompt: bool = False) -> dict[str, str | None]:
    """``{"strict": the digit run right after the last answer prompt (or at the start of a bare answer segment),
    "flexible": the last digit run in the text}``, each as space-separated digits, or None."""
    def canon(run: str | None) -> str | None:
        return None if run is None else " ".join("".join(run.split()))

    runs = DIGIT_RUN_RE.findall(text)
    at = text.rfind(answer_prompt) if answer_prompt else -1
    if at < 0 and require_prompt:
        strict = None
    else:
        after = text[at + len(answer_prompt):] if at >= 0 else text
        m = DIGIT_RUN_RE.match(after.lstrip())
        strict = m.group(0) if m else None
    return {"strict": canon(strict), "flexible": canon(runs[-1] if runs else None)}


def digits_match(pred: str | None, gold: str) -> bool:
    """Exact match of two digit sequences, whitespace ignored."""
    return pred is not None and "".join(pred.split()) == "".join(gold.split())


def digit_places(pred: str | None, gold: str) -> list[bool]:
    """For each gold digit, whether `pred` has it at the same place (whitespace ignored; a missing digit is
    wrong, extra digits are ignored). Multiplication writes the least significant digit first, so place k is
    the product's digit k, whose computation sums k + 1 pairwise digit products."""
    g, p = "".join(gold.split()), "".join((pred or "").split())
    return [k < len(p) and p[k] == d for k, d in enumerate(g)]


def digit_agreement(pred: str | None, gold: str) -> float:
    """The share of the gold digits that `pred` has at the same place (`digit_places`). Exact match decides the
    accuracy; this graded score tells a model that gets 9 of 10 digits right from one that gets none
    (multiplication's latent students)."""
    places = digit_places(pred, gold)
    return sum(places) / len(places) if places else 0.0


def place_accuracy(places: list[list[bool]]) -> list[float]:
    """The accuracy of each answer place over examples (`digit_places` of each; place k averaged over the
    examples whose gold answer has it): which digits a model gets, least significant first."""
    width = max((len(p) for p in places), default=0)
    out = []
    for k in range(width):
        have = [p[k] for p in places if len(p) > k]
        out.append(sum(have) / len(have))
    return out


def extract(text: str, kind: str = "number", answer_prompt: str = ANSWER_PROMPT,
            require_prompt: bool = False) -> dict[str, str | None]:
    """`extract_answer` (numbers) or `extract_digits` (digit strings), by the record's answer kind."""
    if kind == "digits":
        return extract_digits(text, answer_prompt, require_prompt)
    if kind != "number":
        raise ValueError(f"unknown answer kind {kind!r}; allowed values: {', '.join(ANSWER_KINDS)}")
    return extract_answer(text, answer_prompt, require_prompt)


def answer_matches(pred: str | None, gold: str, kind: str = "number") -> bool:
    """`numbers_match` or `digits_match`, by the record's answer kind."""
    return digits_match(pred, gold) if kind == "digits" else numbers_match(pred, gold)


# ----------------------------------------------------------------------------------------------------
# scoring a set of predictions


def score_predictions(
    predictions: Sequence[str], records: Sequence[Record], answer_prompt: str = ANSWER_PROMPT, require_prompt: bool = False
) -> dict:
    """Accuracy of `predictions[i]` against `records[i].answer`, strict and flexible, with the per-item
    extractions so a report can show what was read."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        raise ValueError("no predictions to score")
    extracted = [extract(p, r.answer_kind, answer_prompt, require_prompt) for p, r in zip(predictions, records)]
    correct = [answer_matches(e["strict"], r.answer, r.answer_kind) for e, r in zip(extracted, records)]
    correct_flex = [answer_matches(e["flexible"], r.answer, r.answer_kind) for e, r in zip(extracted, records)]
    n = len(records)
    return {
        "accuracy": sum(correct) / n,
        "accuracy_flexible": sum(correct_flex) / n,
        "accuracy_stderr": binomial_stderr(sum(correct) / n, n),
        "accuracy_flexible_stderr": binomial_stderr(sum(correct_flex) / n, n),
        "count": n,
        "correct": correct,
        "correct_flexible": correct_flex,
        "extracted": extracted,
    }


def binomial_stderr(accuracy: float | None, n: int) -> float | None:
    """Standard error of an accuracy over `n` problems, as lm-evaluation-harness prints it: the sample
    standard deviation of the 0/1 scores over sqrt(n), i.e. sqrt(p (1 - p) / (n - 1)); 0 for n = 1."""
    if accuracy is None or n < 1:
        return None
    return math.sqrt(accuracy * (1.0 - accuracy) / (n - 1)) if n > 1 else 0.0


PREDICTION_FIELDS = ("prediction", "generated")  # kava score's own format, and `kava eval`'s predictions.jsonl


def read_predictions(pred_path: str | Path, n_records: int, *, subset: bool = False,
                     expected: Sequence[int] | None = None) -> dict[int, str]:
    """Predictions from JSONL lines ``{"index": int, "prediction": str}`` (or a `kava eval` predictions.jsonl,
    whose text is under ``generated``), as {index: prediction}. Every index is in ``range(n_records)`` and
    appears once; unless `subset`, every index of `expected` (default: that range) must appear. Errors name the
    file, line and index."""
    path = Path(pred_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    preds: dict[int, str] = {}
    first_line: dict[int, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected an object {{\"index\": int, \"prediction\": str}}")
            idx = obj.get("index")
            pred = next((obj[k] for k in PREDICTION_FIELDS if k in obj), None)
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise ValueError(f"{where}: 'index' must be an integer, got {idx!r}")
            if not isinstance(pred, str):
                raise ValueError(f"{where}: 'prediction' must be a string, got {type(pred).__name__}")
            if not 0 <= idx < n_records:
                raise ValueError(f"{where}: index {idx} out of range for {n_records} records")
            if idx in preds:
                raise ValueError(f"{where}: index {idx} duplicated (first on line {first_line[idx]})")
            preds[idx], first_line[idx] = pred, lineno
    expected = range(n_records) if expected is None else expected
    missing = [i for i in expected if i not in preds]
    if missing and not subset:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{path}: predictions missing for {len(missing)} of {len(expected)} indices: {shown}")
    if not preds:
        raise ValueError(f"{path}: no predictions")
    return dict(sorted(preds.items()))


def describe_indices(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def score_file(
    pred_path: str | Path, records: Sequence[Record], answer_prompt: str = ANSWER_PROMPT, require_prompt: bool = False,
    *, subset: bool = False, skipped: int = 0,
) -> dict:
    """`score_predictions` on a predictions JSONL file (see `read_predictions` for its format). An index is a
    record's place in its file (`Record.index`, as `kava eval` writes it; its place in `records` for records
    built by hand), so `skipped` entries the reader left out keep theirs: a prediction for one is listed in
    ``skipped_predictions``, not scored. With `subset`, only the indices the file holds are scored (a
    `kava eval --limit N` file): ``indices`` lists them and ``of`` is the number of records."""
    index = [k if r.index is None else r.index for k, r in enumerate(records)]
    at = dict(zip(index, records))
    preds = read_predictions(pred_path, max(len(records) + skipped, max(index, default=-1) + 1), subset=subset,
                             expected=index)
    idx = [i for i in preds if i in at]
    if not idx:
        raise ValueError(f"{pred_path}: no predictions for the records read (only for skipped ones: "
                         f"{describe_indices(list(preds))})")
    res = score_predictions([preds[i] for i in idx], [at[i] for i in idx], answer_prompt, require_prompt)
    res.update({"indices": idx, "of": len(records), "skipped_predictions": [i for i in preds if i not in at]})
    return res
