"""Multi-digit multiplication in iCoT's line format (Deng et al. 2023, arXiv 2311.01460; 2024, arXiv 2405.14838).

The published benchmark where one forward pass fails and a written chain of thought does not: No-CoT is near 0%
on 5x5, CoT near 100%. One problem per line, every number least-significant digit first, digits separated by
spaces (2365 x 4347 = 10,280,655)::

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1

The CoT (`mult_steps`): for each digit b_i of B (least significant first) the partial product A·b_i·10^i written
with n+1+i digits; from the second to the next-to-last one, the running sum after it in ``( ... )``, also n+1+i
digits. The answer is A·B with 2n digits, leading zeros kept. This rule reproduces every line of the published
valid and test files (tests/test_multiplication.py). The CoT steps kava trains on are the partial products, each
with its running sum (``+ 0 0 6 4 9 0 ( 5 5 1 1 1 1 )``), so Coconut's stages and iCoT's removal act on the
serial work; joined by spaces they give the CoT text exactly.

The answer is a digit string, not a number: it is scored by exact match of its digit sequence
(`kava.scoring`, ``Record.answer_kind == "digits"``), never through number normalisation (``0 0 6`` is not 6).

The published 808,000-line training files are Git LFS objects; `write_multiplication` generates a training set
by the same rule, deterministic from the seed, operands with n digits and a nonzero leading digit (as in the
published files), and without any question of the `exclude` set (the published valid and test inputs).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from pathlib import Path

from kava.data.records import Record, SkipLog
from kava.data.synthetic import check_splits, write_meta, write_splits

MULT_VERSION = "kava-multiplication-1"
MULT_SPLITS = ("valid", "test", "train")  # generation order: the eval splits claim questions first
MAX_DIGITS = 20
_NUM = r"\d(?: \d)*"
LINE_RE = re.compile(rf"({_NUM}) \* ({_NUM})\|\|(.*) #### ({_NUM})")
QUESTION_RE = re.compile(rf"({_NUM}) \* ({_NUM})")


def lsd(value: int, width: int) -> str:
    """`value` with `width` digits (zero-padded), least-significant digit first, space-separated:
    ``lsd(2365, 4) == "5 6 3 2"``."""
    s = str(value).zfill(width)
    if len(s) > width:
        raise ValueError(f"{value} has more than {width} digits")
    return " ".join(reversed(s))


def read_lsd(text: str) -> int:
    """The inverse of `lsd`: ``"5 6 3 2"`` -> 2365."""
    return int("".join(reversed(text.split())))


def mult_steps(a: int, b: int, digits: int) -> list[str]:
    """The CoT steps of a x b with `digits`-digit operands (module docstring): one per digit of b."""
    n = digits
    steps, total = [], 0
    for i, d in enumerate(reversed(str(b).zfill(n))):
        part = a * int(d) * 10**i
        total += part
        text = lsd(part, n + 1 + i)
        if i == 0:
            steps.append(text)
        elif i < n - 1:
            steps.append(f"+ {text} ( {lsd(total, n + 1 + i)} )")
        else:
            steps.append(f"+ {text}")
    return steps


def question(a: int, b: int, digits: int) -> str:
    return f"{lsd(a, digits)} * {lsd(b, digits)}"


def mult_line(a: int, b: int, digits: int) -> str:
    """One problem in iCoT's line format (the published files' exact bytes, without the newline)."""
    return f"{question(a, b, digits)}||{' '.join(mult_steps(a, b, digits))} #### {lsd(a * b, 2 * digits)}"


def parse_question(text: str) -> tuple[int, int, int]:
    """(a, b, digits) of a question ``"5 6 3 2 * 7 4 3 4"``; ValueError if it is not one."""
    m = QUESTION_RE.fullmatch(text.strip())
    if m is None or len(m.group(1).split()) != len(m.group(2).split()):
        raise ValueError(f"not a multiplication question of two n-digit operands: {text!r}")
    return read_lsd(m.group(1)), read_lsd(m.group(2)), len(m.group(1).split())


def split_cot(cot: str) -> tuple[str, ...]:
    """Steps of a multiplication CoT: the first partial product, then each ``+ partial ( sum )``; joined by
    spaces they are `cot` again."""
    parts = cot.strip().split(" + ")
    return tuple([parts[0]] + ["+ " + p for p in parts[1:]]) if cot.strip() else ()


def is_mult_line(line: str) -> bool:
    return LINE_RE.fullmatch(line.strip()) is not None


def mult_record(line: str, where: str, skips: SkipLog) -> Record | None:
    """The record of a multiplication line (`kava.data.readers` reads the file). Question ``"5 6 3 2 * 7 4 3 4"``,
    steps `split_cot`, answer the digit string as written (``answer_kind="digits"``). A line that is not of this
    form, or whose answer is not A x B with 2n digits, is a counted skip (None)."""
    m = LINE_RE.fullmatch(line.strip())
    if m is None:
        skips.skip("not a multiplication line (A * B||CoT #### C, digits least significant first)", where)
        return None
    qa, qb, cot, ans = m.groups()
    n = len(qa.split())
    if len(qb.split()) != n or len(ans.split()) != 2 * n or read_lsd(qa) * read_lsd(qb) != read_lsd(ans):
        skips.skip("answer is not A x B with 2n digits", where)
        return None
    return Record(question=f"{qa} * {qb}", steps=split_cot(cot), answer=ans, source=where, answer_kind="digits")


def exclusion_key(questions: Iterable[str]) -> str:
    """8 hex digits naming a set of excluded questions (part of the generated folder's name)."""
    h = hashlib.sha256("\n".join(sorted(" ".join(q.split()) for q in questions)).encode()).hexdigest()
    return h[:8]


def write_multiplication(out_dir: str | Path, sizes: dict[str, int], seed: int = 0, digits: int = 4,
                         exclude: Iterable[str] = ()) -> dict:
    """Write ``<split>.txt`` (iCoT lines) for each split in `sizes` plus ``meta.json``; return the meta.

    Each split draws from its own ``random.Random`` seeded by (seed, digits, split); operands are uniform over the
    n-digit numbers with a nonzero leading digit. No question repeats within or across splits, and none is in
    `exclude` (questions as `question` writes them): such a draw is redrawn and counted in
    ``meta["redrawn"]``. The eval splits are drawn first, so train's size does not change them.
    """
    check_splits(sizes, MULT_SPLITS, "multiplication")
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits must be in [1, {MAX_DIGITS}], got {digits}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    pairs = (hi - lo + 1) ** 2
    excluded = {" ".join(q.split()) for q in exclude}
    if sum(sizes.values()) + len(excluded) > pairs // 2:
        raise ValueError(f"{sum(sizes.values())} problems asked of {pairs} distinct {digits}x{digits} products: "
                         "at most half of them can be drawn")
    seen: set[tuple[int, int]] = set()

    def draw(split: str, size: int, rng: random.Random) -> tuple[list[str], dict[str, int]]:
        lines, again = [], {"within_or_across_splits": 0, "excluded": 0}
        while len(lines) < size:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if (a, b) in seen:
                again["within_or_across_splits"] += 1
            elif excluded and question(a, b, digits) in excluded:
                again["excluded"] += 1
            else:
                seen.add((a, b))
                lines.append(mult_line(a, b, digits))
        return lines, again

    counts, redrawn = write_splits(out_dir, sizes, MULT_SPLITS, f"{MULT_VERSION}:{seed}:{digits}", draw, suffix=".txt")
    return write_meta(out_dir, {
        "generator": MULT_VERSION, "task": "multiplication", "seed": seed, "digits": digits, "counts": counts,
        "redrawn": redrawn, "excluded_questions": len(excluded),
        "exclusion_key": exclusion_key(excluded) if excluded else None,
        "files": {s: f"{s}.txt" for s in counts}, "format": "multiplication"})


def mult_tokens() -> list[str]:
    """What the local tokenizer of a multiplication run keeps as single tokens: each digit and symbol with the
    space before it (``" 5"``, ``" *"``, ``" ####"``), so that every digit and symbol is one token, as GPT-2's
    tokenizer has it (`kava.data.tokenizer.build_tokenizer(single_tokens=...)`). A number's first digit after
    the BOS has no space and is the plain digit token. `" $"` is the separator of the official layout
    (`data.question_suffix`)."""
    return [f" {d}" for d in "0123456789"] + [" *", " +", " (", " )", " ####", " $"]
