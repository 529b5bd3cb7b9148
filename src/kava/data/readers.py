"""Readers for every data format KaVa trains or evaluates on, all producing `Record`s.

Formats: the iCoT text format (``question||<<a=b>> <<c=d>> #### N``), iCoT's multiplication lines
(``5 6 3 2 * 7 4 3 4||... #### 5 5 6 0 8 2 0 1``, `kava.data.multiplication`: digit-string answers), GSM8k JSONL (``#### N`` answers
with ``<<expr=result>>`` calculator annotations), GSM-Hard / PAL JSONL (``input``/``target``), SVAMP
(``SVAMP.json`` or PAL's ``svamp.jsonl``), generic JSONL, and Hugging Face Hub datasets.

Every reader reports a bad record to a `SkipLog` under a fixed reason string (or raises `DataError`
naming ``<path>:<line>`` in strict mode); nothing is dropped silently, because a silently shrunken
evaluation set makes accuracies incomparable with published ones. Answers are normalised once, here,
by `normalize_number`, so every later comparison sees the same canonical string.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

from kava.data import multiplication
from kava.data.records import DataError, Record, SkipLog

FORMATS = ("auto", "icot", "multiplication", "gsm8k", "gsm_hard", "svamp", "jsonl", "hub")
ANSWER_PROMPT = "The answer is:"
# `data.cot_style`: GSM8k's calculator annotations, its solution sentences, or the sentences with their annotations
# (GSM8k's answer text as written, the form the published fine-tunes train on; GSM8k-style JSONL only)
COT_STYLES = ("equation", "nl", "nl_annotated")

EQUATION_RE = re.compile(r"<<[^>]*>>")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION_RE = re.compile(r"([-+]?\d+)/(\d+)")
# A number with commas is a number only when they separate thousands: 2,125 and 1,234,567.5, not 1,5 or 12,34.
THOUSANDS_RE = re.compile(r"[-+]?\$?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")
# Words ending in '.' that do not end a sentence ("Mr. Trent", "e.g. 5").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft vs etc e.g i.e approx no inc ltd co".split()
)
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"'’”)\]]*(?=\s)")
# iCoT's train_no_aug.txt joins GSM8k solution lines with spaces and most lines lack a final period
# ("... = $6 The total price ..."): a number followed by a capitalised word marks such a lost break.
_LOST_BREAK_RE = re.compile(r"(?<=[\d%])\s+(?=[A-Z][a-z]+\b)")


# ----------------------------------------------------------------------------------------------------
# answers and chains of thought


def normalize_number(value: Any) -> str | None:
    """Canonical string for a numeric answer, or None if it is not a number.

    Thousands separators are removed and floats lose a zero fraction (``"2,125"`` -> ``"2125"``,
    ``3431580.0`` -> ``"3431580"``, ``-12.5`` -> ``"-12.5"``, ``2.0107e-06`` -> ``"0.0000020107"``,
    ``"36."`` -> ``"36"``). A simple fraction with a terminating decimal (``"2/5"``) becomes that decimal
    (``"0.4"``); a non-terminating one (``"1/3"``) is None, because any decimal for it is lossy. Commas that
    do not separate groups of three digits make it no number (``"1,5"``, ``"12,34"``: None, not 15 or 1234;
    `kava.scoring` reads a generated ``1,5`` the same way).
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
        if "," in text:
            if not THOUSANDS_RE.fullmatch(text):
                return None
            text = text.replace(",", "")
    else:
        return None
    frac = _FRACTION_RE.fullmatch(text)
    if frac:
        if int(frac.group(2)) == 0:
            return None
        f = Fraction(int(frac.group(1)), int(frac.group(2)))
        den = f.denominator
        for p in (2, 5):
            while den % p == 0:
                den //= p
        if den != 1:
            return None
        with localcontext() as ctx:
            ctx.prec = 100
            d = Decimal(f.numerator) / Decimal(f.denominator)
    elif _NUMBER_RE.fullmatch(text):
        d = Decimal(text)
    else:
        return None
    out = format(d, "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    if out in ("-0", "+0", ""):
        out = "0"
    return out.lstrip("+")


def split_sentences(text: str) -> list[str]:
    """Split natural-language CoT into sentences, keeping punctuation.

    A break needs whitespace after ``.!?``, so decimals (``3.5``) and prices (``$4.50``) never split;
    titles such as ``Mr.`` and a following lowercase word do not end a sentence either. A number then
    a capitalised word (``= $6 The total``) is also a break: see `_LOST_BREAK_RE`.
    """
    out, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        before = text[start : m.start()].split()
        word = before[-1].lower().lstrip("(\"'") if before else ""
        rest = text[m.end() :].lstrip()
        if word in _ABBREVIATIONS or (rest and rest[0].islower()):
            continue
        out.append(text[start : m.end()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for piece in out for s in _LOST_BREAK_RE.split(piece) if s.strip()]


def split_cot(cot: str) -> tuple[str, ...]:
    """Steps of a CoT string: its ``<<...>>`` equations if it has any, else its sentences."""
    cot = cot.strip()
    if not cot:
        return ()
    if "<<" in cot:
        eqs = EQUATION_RE.findall(cot)
        if eqs:
            return tuple(eqs)
    return tuple(split_sentences(cot))


def _steps_from_list(value: list, where: str, skips: SkipLog, name: str) -> tuple[str, ...] | None:
    if not all(isinstance(s, str) for s in value):
        skips.skip(f"bad field type: {name}", where)
        return None
    return tuple(s.strip() for s in value if s.strip())


def _make_record(question: Any, steps: tuple[str, ...], answer: Any, where: str, skips: SkipLog) -> Record | None:
    """Validate question/answer and build the record; every reader ends here so the checks agree."""
    if not isinstance(question, str) or not question.strip():
        skips.skip("empty question", where)
        return None
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        skips.skip("empty answer", where)
        return None
    norm = normalize_number(answer)
    if norm is None:
        skips.skip("non-numeric answer", where)
        return None
    return Record(question=question.strip(), steps=steps, answer=norm, source=where)


def _split_hashes(text: str, where: str, skips: SkipLog) -> tuple[str, str] | None:
    """``solution #### answer`` -> (solution, answer); exactly one ``####`` is allowed."""
    n = text.count("####")
    if n == 0:
        skips.skip("missing ####", where)
        return None
    if n > 1:
        skips.skip("duplicated ####", where)
        return None
    sol, ans = text.split("####")
    return sol, ans


# ----------------------------------------------------------------------------------------------------
# one row (a dict from JSON or the hub) -> Record, one function per schema


def _require(obj: dict, names: Iterable[str], where: str, skips: SkipLog) -> bool:
    for name in names:
        if name not in obj:
            skips.skip(f"missing field: {name}", where)
            return False
    return True


def _row_gsm8k(obj: dict, where: str, skips: SkipLog, cot_style: str = "equation", **_: Any) -> Record | None:
    """GSM8k: ``answer`` is the solution text with ``<<expr=result>>`` annotations then ``#### N``."""
    if not _require(obj, ("question", "answer"), where, skips):
        return None
    if not isinstance(obj["answer"], str):
        skips.skip("bad field type: answer", where)
        return None
    parts = _split_hashes(obj["answer"], where, skips)
    if parts is None:
        return None
    sol, ans = parts
    if cot_style == "equation":
        steps = tuple(EQUATION_RE.findall(sol))
    else:  # one step per solution line; "nl" drops the annotations, "nl_annotated" keeps them as written
        lines = (line if cot_style == "nl_annotated" else EQUATION_RE.sub("", line) for line in sol.split("\n"))
        steps = tuple(line.strip() for line in lines if line.strip())
    return _make_record(obj["question"], steps, ans, where, skips)


def _row_pal(obj: dict, where: str, skips: SkipLog, **_: Any) -> Record | None:
    """PAL's flattened format (GSM-Hard, svamp.jsonl): ``input`` question, numeric ``target``."""
    if not _require(obj, ("input", "target"), where, skips):
        return None
    return _make_record(obj["input"], (), obj["target"], where, skips)


def svamp_question(body: str, question: str) -> str:
    """SVAMP question text joined exactly as PAL's svamp.jsonl does, so both files give equal records."""
    b = body.strip()
    return b + ("" if b.endswith(".") else ".") + " " + question.strip()


def _row_svamp(obj: dict, where: str, skips: SkipLog, **_: Any) -> Record | None:
    """SVAMP: ``Body`` + ``Question`` and a float ``Answer``; PAL rows (``input``) are accepted too."""
    if "input" in obj and "Body" not in obj:
        return _row_pal(obj, where, skips)
    if not _require(obj, ("Body", "Question", "Answer"), where, skips):
        return None
    body, q = obj["Body"], obj["Question"]
    if not isinstance(body, str) or not isinstance(q, str):
        skips.skip("bad field type: Body/Question", where)
        return None
    if not (body.strip() or q.strip()):
        skips.skip("empty question", where)
        return None
    return _make_record(svamp_question(body, q), (), obj["Answer"], where, skips)


def _row_fields(
    obj: dict,
    where: str,
    skips: SkipLog,
    question_field: str = "question",
    steps_field: str | None = "steps",
    answer_field: str = "answer",
    **_: Any,
) -> Record | None:
    """Generic row: steps are a list of strings, a CoT string (split like iCoT), or absent (None field)."""
    names = [question_field, answer_field] + ([steps_field] if steps_field else [])
    if not _require(obj, names, where, skips):
        return None
    steps: tuple[str, ...] | None = ()
    value = obj[steps_field] if steps_field else None
    if isinstance(value, str):
        steps = split_cot(value)
    elif isinstance(value, (list, tuple)):
        steps = _steps_from_list(list(value), where, skips, str(steps_field))
    elif value is not None:
        skips.skip(f"bad field type: {steps_field}", where)
        return None
    if steps is None:
        return None
    return _make_record(obj[question_field], steps, obj[answer_field], where, skips)


_ROW_PARSERS: dict[str, Callable[..., Record | None]] = {
    "gsm8k": _row_gsm8k,
    "gsm_hard": _row_pal,
    "svamp": _row_svamp,
    "fields": _row_fields,
    "steps": lambda o, w, s, **kw: _row_fields(o, w, s, "question", "steps", "answer"),
    "cot": lambda o, w, s, **kw: _row_fields(o, w, s, "question", "cot", "answer"),
}
HUB_SCHEMAS = tuple(_ROW_PARSERS)


# ----------------------------------------------------------------------------------------------------
# files


def _not_found(path: str | Path) -> str:
    """`<path>: file not found`, and where a relative path was looked for (the current directory)."""
    p = Path(path)
    return f"{path}: file not found" + ("" if p.is_absolute() else f" (looked at {p.absolute()})")


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(_not_found(path))
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    return p


def _placed(rec: Record, out: list[Record], skips: SkipLog, skipped_before: int) -> Record:
    """`rec` with its `Record.index`: each entry before it is a record in `out` or one skip counted since the
    reader started (`skipped_before` = the count then), whichever line, element or row it was."""
    return replace(rec, index=len(out) + skips.total - skipped_before)


def _finish(records: list[Record], where: str, skips: SkipLog, limit: int | None) -> list[Record]:
    if not records and limit != 0:
        extra = f" ({skips.summary()})" if skips.total else ""
        raise DataError(f"{where}: no records{extra}")
    return records


def _collect(entries: Iterable[tuple[str, Any]], parse: Callable[[Any, str], Record | None], skips: SkipLog,
             limit: int | None, name: str) -> list[Record]:
    """The parse loop of every reader: `parse(entry, where)` for each (where, entry) of `entries` (a line, a
    JSON element, a row; read lazily, so `limit` stops reading), each record placed (`Record.index`); an entry
    it does not make a record of is one counted skip. No records at all is a `DataError` naming `name`."""
    out: list[Record] = []
    if limit == 0:
        return out
    start = skips.total
    for where, entry in entries:
        rec = parse(entry, where)
        if rec is not None:
            out.append(_placed(rec, out, skips, start))
            if limit is not None and len(out) >= limit:
                break
    return _finish(out, name, skips, limit)


def _numbered(path: str | Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[str, str]]:
    """(``"<path>:<line>"``, text) of (line number, text) pairs."""
    for lineno, line in lines:
        yield f"{path}:{lineno}", line


def _iter_lines(path: Path, skips: SkipLog) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; undecodable lines are skipped as invalid utf-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.skip("invalid utf-8", f"{path}:{lineno}")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, element) of a JSON array file; a broken array cannot be resynchronised, so it raises."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid utf-8") from e
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    try:
        while i < len(text) and text[i] != "]":
            obj, j = dec.raw_decode(text, i)
            line += text.count("\n", counted, i)
            counted = i
            yield line, obj
            i = ws.match(text, j).end()
            if i < len(text) and text[i] == ",":
                i = ws.match(text, i + 1).end()
            elif i >= len(text) or text[i] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, i)
        if i >= len(text):
            raise json.JSONDecodeError("unterminated array", text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid json ({e.msg}); a JSON array cannot skip a bad element") from e


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def iter_json_objects(path: str | Path, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """(``"<path>:<line>"``, object) for a JSONL file or a JSON array file."""
    p = _check_file(path)
    if _is_json_array(p):
        for lineno, obj in _iter_json_array(p):
            where = f"{path}:{lineno}"
            if isinstance(obj, dict):
                yield where, obj
            else:
                skips.skip("not a json object", where)
        return
    for lineno, line in _iter_lines(p, skips):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skips.skip("invalid json", where)
            continue
        if isinstance(obj, dict):
            yield where, obj
        else:
            skips.skip("not a json object", where)


def _read_objects(
    path: str | Path, parser: Callable[..., Record | None], skips: SkipLog | None, limit: int | None, **opts: Any
) -> list[Record]:
    skips = SkipLog() if skips is None else skips
    _check_file(path)
    return _collect(iter_json_objects(path, skips), lambda obj, where: parser(obj, where, skips, **opts), skips,
                    limit, str(path))


def icot_separator(line: str) -> tuple[int | None, str | None]:
    """(where an iCoT line's ``||`` between question and CoT is, None), or (None, the skip reason).

    With an equation CoT the separator is the last ``||`` before its first ``<<``, so that a question may
    contain ``||`` (``Q d || with bars?||<<1+2=3>> #### 3`` -> question ``Q d || with bars?``); a ``||`` after
    it is in the CoT ("|| in the CoT"), and a ``<<`` before every ``||`` is in the question ("<< in the
    question"). A natural-language CoT has no mark where it starts: a second ``||`` could be the question's or
    the CoT's ("|| more than once in a natural-language line"; iCoT's own reader, which keeps only lines with
    exactly one ``||``, drops these too). A ``||`` after ``####`` does not count ("missing ||")."""
    end = line.find("####")
    head = line if end < 0 else line[:end]
    bars = head.count("||")
    if bars == 0:
        return None, "missing ||"
    eq = head.find("<<")
    if eq < 0:
        return (head.find("||"), None) if bars == 1 else (None, "|| more than once in a natural-language line")
    i = head.rfind("||", 0, eq)
    if i < 0:
        return None, "<< in the question"
    return (i, None) if "||" not in head[i + 2:] else (None, "|| in the CoT")


def read_icot(path: str | Path, skips: SkipLog | None = None, limit: int | None = None) -> list[Record]:
    """iCoT text format, one ``question||cot #### answer`` per line (gsm8k-aug test/valid/train)."""
    skips = SkipLog() if skips is None else skips
    p = _check_file(path)

    def parse(line: str, where: str) -> Record | None:
        sep, why = icot_separator(line)
        if sep is None:
            skips.skip(why, where)
            return None
        question, rest = line[:sep], line[sep + 2:]
        parts = _split_hashes(rest, where, skips)
        if parts is None:
            return None
        return _make_record(question, split_cot(parts[0]), parts[1], where, skips)

    return _collect(_numbered(path, _iter_lines(p, skips)), parse, skips, limit, str(path))


def icot_line(rec: Record, answer: str | None = None) -> str:
    """One record in the iCoT text format, ``question||step step #### answer``: the inverse of `read_icot`.

    answer: the answer as written in the source (default: the record's normalised one, e.g. ``2125`` for
    ``2,125``)."""
    return f"{rec.question}||{' '.join(rec.steps)} #### {rec.answer if answer is None else answer}"


def gsm8k_icot_lines(path: str | Path, skips: SkipLog | None = None, limit: int | None = None) -> list[str]:
    """GSM8k JSONL as iCoT text lines in GSM8k-Aug's equation-only form: the ``<<expr=result>>`` calculator
    annotations joined by spaces, the answer as GSM8k writes it. This is how GSM8k-Aug's test and valid files
    were built from GSM8k (tested: 1,319 of 1,319 test lines and the 500 valid lines equal). Bad records are
    counted in `skips` exactly as `read_gsm8k_jsonl` counts them."""
    skips = SkipLog() if skips is None else skips
    out: list[str] = []
    for where, obj in iter_json_objects(path, skips):
        rec = _row_gsm8k(obj, where, skips, cot_style="equation")
        if rec is not None:
            out.append(icot_line(rec, obj["answer"].split("####")[1].strip()))
            if limit is not None and len(out) >= limit:
                break
    return out


def write_icot(lines: Iterable[str], path: str | Path) -> int:
    """Write iCoT text lines (`icot_line`, `gsm8k_icot_lines`) to a file; returns the count."""
    lines = list(lines)
    Path(path).write_text("".join(ln + "\n" for ln in lines))
    return len(lines)


def read_gsm8k_jsonl(
    path: str | Path, cot_style: str = "equation", skips: SkipLog | None = None, limit: int | None = None
) -> list[Record]:
    """GSM8k JSONL. ``equation``: the ``<<expr=result>>`` annotations; ``nl``: solution lines without them."""
    if cot_style not in COT_STYLES:
        raise DataError(f"cot_style must be one of {', '.join(COT_STYLES)}; got {cot_style!r}")
    return _read_objects(path, _row_gsm8k, skips, limit, cot_style=cot_style)


def read_gsm_hard(path: str | Path, skips: SkipLog | None = None, limit: int | None = None) -> list[Record]:
    """GSM-Hard (PAL ``gsmhardv2.jsonl``): ``input`` and float ``target``; no CoT. ``code`` is never run."""
    return _read_objects(path, _row_pal, skips, limit)


def read_svamp(path: str | Path, skips: SkipLog | None = None, limit: int | None = None) -> list[Record]:
    """SVAMP from ``SVAMP.json`` (Body/Question/Answer) or PAL's ``svamp.jsonl`` (input/target)."""
    return _read_objects(path, _row_svamp, skips, limit)


def read_jsonl(
    path: str | Path,
    question_field: str = "question",
    steps_field: str | None = "steps",
    answer_field: str = "answer",
    skips: SkipLog | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Generic JSONL (or JSON array). Steps are a list of strings or one CoT string; None means no CoT."""
    return _read_objects(
        path, _row_fields, skips, limit,
        question_field=question_field, steps_field=steps_field, answer_field=answer_field,
    )


# ----------------------------------------------------------------------------------------------------
# Hugging Face Hub

# hub id (lower case) -> (row schema, config name)
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "whynlp/gsm8k-aug": ("steps", None),
    "whynlp/gsm8k-aug-nl": ("steps", None),
    "zen-e/gsm8k-aug": ("cot", None),
    "zen-e/gsm8k-aug-nl": ("cot", None),
    "openai/gsm8k": ("gsm8k", "main"),
    "gsm8k": ("gsm8k", "main"),
    "reasoning-machines/gsm-hard": ("gsm_hard", None),
    "chilled/svamp": ("svamp", None),
}


def infer_schema(columns: Iterable[str]) -> str:
    """Row schema from column names, for hub ids not in `HUB_DATASETS`."""
    cols = set(columns)
    if {"Body", "Question", "Answer"} <= cols:
        return "svamp"
    if {"input", "target"} <= cols:
        return "gsm_hard"
    if {"question", "steps", "answer"} <= cols:
        return "steps"
    if {"question", "cot", "answer"} <= cols:
        return "cot"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    raise DataError(f"cannot infer the schema from columns {sorted(cols)}; pass fields=")


def records_from_rows(
    rows: Iterable[dict],
    schema: str,
    where_prefix: str,
    *,
    fields: dict | None = None,
    cot_style: str = "equation",
    skips: SkipLog | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Map rows (e.g. a `datasets.Dataset`) of a known schema to records; ``where`` is ``prefix:index``.

    schema: ``steps`` (question/steps list/answer: whynlp), ``cot`` (question/cot string/answer: zen-E),
    ``gsm8k`` (question/answer with ``####``), ``gsm_hard`` (input/target), ``svamp`` (Body/Question/
    Answer), or ``fields`` (the `fields` mapping with keys question/steps/answer).
    """
    if schema not in _ROW_PARSERS:
        raise DataError(f"unknown row schema {schema!r}; expected one of {HUB_SCHEMAS}")
    skips = SkipLog() if skips is None else skips
    opts: dict[str, Any] = {"cot_style": cot_style}
    if schema == "fields":
        opts.update(_field_opts(fields))
    parser = _ROW_PARSERS[schema]

    def parse(row: Any, where: str) -> Record | None:
        if not isinstance(row, dict):
            skips.skip("not a json object", where)
            return None
        return parser(row, where, skips, **opts)

    # each row is a record or one counted skip, so a record's place is its row number
    return _collect(((f"{where_prefix}:{i}", row) for i, row in enumerate(rows)), parse, skips, limit, where_prefix)


def _field_opts(fields: dict | None) -> dict[str, Any]:
    fields = dict(fields or {})
    unknown = set(fields) - {"question", "steps", "answer"}
    if unknown:
        raise DataError(f"fields= takes keys question/steps/answer, got {sorted(unknown)}")
    return {
        "question_field": fields.get("question", "question"),
        "steps_field": fields.get("steps", "steps"),
        "answer_field": fields.get("answer", "answer"),
    }


def read_hub(
    hub_id: str,
    split: str,
    *,
    config: str | None = None,
    fields: dict | None = None,
    cot_style: str = "equation",
    skips: SkipLog | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Load a Hugging Face dataset split (``datasets`` imported only here) and map its rows to records."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading {hub_id!r} from the Hugging Face Hub needs the optional `datasets` package: "
            "pip install 'kava-latent[hub]'"
        ) from e
    known_schema, known_config = HUB_DATASETS.get(hub_id.lower(), (None, None))
    config = config if config is not None else known_config
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # network, auth, unknown split: report it as a data problem with the id
        raise DataError(f"{hub_id}: could not load split {split!r} (config {config!r}): {e}") from e
    schema = "fields" if fields else (known_schema or infer_schema(ds.column_names))
    prefix = f"{hub_id}[{split}]"
    return records_from_rows(ds, schema, prefix, fields=fields, cot_style=cot_style, skips=skips, limit=limit)


# ----------------------------------------------------------------------------------------------------
# one entry point


SAMPLE_LINES = 50  # records read to decide a file's format


def _sample_objects(path: Path, n: int = SAMPLE_LINES) -> list[Any]:
    """The first `n` records of a JSONL / JSON-array file, each parsed (None where a line is no JSON)."""
    out: list[Any] = []
    if _is_json_array(path):
        try:
            for _, obj in _iter_json_array(path):
                out.append(obj)
                if len(out) >= n:
                    break
        except DataError:
            out.append(None)
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line.lstrip("\ufeff")))
            except json.JSONDecodeError:
                out.append(None)
            if len(out) >= n:
                break
    return out


def _object_format(obj: dict) -> str:
    """The reader one JSON object looks like it belongs to."""
    if "Body" in obj and "Question" in obj:
        return "svamp"
    if "target" in obj and ("code" in obj or "input" in obj):
        return "gsm_hard"  # PAL's format: GSM-Hard, and svamp.jsonl, which read_svamp reads identically
    if isinstance(obj.get("answer"), str) and "####" in obj["answer"]:
        return "gsm8k"
    return "jsonl"


def _sample_lines(path: Path, n: int = SAMPLE_LINES) -> list[str]:
    """The first `n` non-blank lines of a text file."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                out.append(line.strip())
            if len(out) >= n:
                break
    return out


def _peek_object(path: Path) -> dict | None:
    """The first readable JSON object among the first records of a JSONL/JSON-array file, or None."""
    return next((o for o in _sample_objects(path) if isinstance(o, dict)), None)


def detect_format_reason(source: str | Path) -> tuple[str, str]:
    """The reader `load_records` would use for `source` (an existing file or a hub id), and how that was
    decided. A JSON file's format is the majority over its first `SAMPLE_LINES` records that parse (ties: the
    earliest), so one truncated or odd first line does not decide it; a ``.txt`` file is iCoT text."""
    p = Path(source)
    if not p.exists():
        if isinstance(source, str) and _HUB_ID_RE.fullmatch(source) and p.suffix not in (".txt", ".json", ".jsonl"):
            return "hub", "a hub id (no such local file)"
        raise DataError(_not_found(source))
    if p.is_dir():
        raise DataError(f"{source}: is a directory; pass split= to pick <split>.jsonl/.txt/.json inside it")
    if p.suffix == ".txt":
        lines = _sample_lines(p)
        mult = sum(multiplication.is_mult_line(ln) for ln in lines)
        if lines and 2 * mult > len(lines):
            return "multiplication", f"a .txt file, {mult} of its first {len(lines)} lines multiplication problems"
        return "icot", "a .txt file"
    sample = _sample_objects(p)
    votes = [_object_format(o) for o in sample if isinstance(o, dict)]
    if not votes:
        if p.suffix in (".json", ".jsonl"):
            return "jsonl", f"none of the first {len(sample)} records is a JSON object"
        return "icot", "no JSON object in its first lines"
    fmt = max(dict.fromkeys(votes), key=votes.count)
    return fmt, f"detected from {votes.count(fmt)} of the first {len(sample)} records"


def detect_format(source: str | Path) -> str:
    """The reader `load_records` would use for `source` (an existing file or a hub id): `detect_format_reason`."""
    return detect_format_reason(source)[0]


def describe_format(source: str | Path, format: str = "auto", split: str | None = None) -> str:
    """The reader `load_records(source, format, split)` uses, and why: ``format gsm8k (auto: detected from
    50 of the first 50 records)``; what the summaries print beside a data source."""
    p = Path(str(source))
    if format != "auto":
        return f"format {format}"
    if p.is_dir():
        p = _resolve_dir(p, split)
    fmt, why = detect_format_reason(p if p.exists() else str(source))
    return f"format {fmt} (auto: {why})"


def _resolve_dir(p: Path, split: str | None) -> Path:
    if split is None:
        raise DataError(f"{p}: is a directory; pass split= to pick <split>.jsonl/.txt/.json inside it")
    for ext in (".jsonl", ".txt", ".json"):
        if (p / f"{split}{ext}").exists():
            return p / f"{split}{ext}"
    raise DataError(f"{p}: no file {split}.jsonl, {split}.txt or {split}.json")


def load_records(
    source: str | Path,
    format: str = "auto",
    split: str | None = None,
    *,
    fields: dict | None = None,
    skips: SkipLog | None = None,
    strict: bool = False,
    limit: int | None = None,
    cot_style: str = "equation",
) -> list[Record]:
    """Read `source` (a file, a directory plus `split`, or a hub id plus `split`) into records.

    format: one of `FORMATS`; ``auto`` picks by extension and the majority of the first records (see
    `detect_format_reason`).
    fields: for ``jsonl``/``hub``, a mapping with keys question/steps/answer naming the columns.
    cot_style: ``equation`` or ``nl``; picks GSM8k's CoT form and the synthetic files' steps_eq/steps_nl.
    strict: raise `DataError` at the first bad record instead of counting it in `skips`.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if cot_style not in COT_STYLES:
        raise DataError(f"cot_style must be one of {', '.join(COT_STYLES)}; got {cot_style!r}")
    if skips is None:
        skips = SkipLog(strict=strict)
    elif strict:
        skips.strict = True
    src = str(source)
    p = Path(src)
    if format == "hub" or (format == "auto" and not p.exists() and detect_format(src) == "hub"):
        if split is None:
            raise DataError(f"{src}: a hub dataset needs split= (e.g. train, validation, test)")
        return read_hub(src, split, fields=fields, cot_style=cot_style, skips=skips, limit=limit)
    if p.is_dir():
        p = _resolve_dir(p, split)
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "icot":
        return read_icot(p, skips, limit)
    if fmt == "multiplication":
        lines = _numbered(p, _iter_lines(_check_file(p), skips))
        return _collect(lines, lambda line, where: multiplication.mult_record(line, where, skips), skips, limit, str(p))
    if fmt == "gsm8k":
        return read_gsm8k_jsonl(p, cot_style, skips, limit)
    if fmt == "gsm_hard":
        return read_gsm_hard(p, skips, limit)
    if fmt == "svamp":
        return read_svamp(p, skips, limit)
    opts = _field_opts(fields)
    if not (fields and "steps" in fields):
        obj = _peek_object(_check_file(p)) or {}
        if "steps_eq" in obj or "steps_nl" in obj:  # the synthetic generator's files
            if cot_style == "nl_annotated":
                raise DataError(f"{p}: cot_style nl_annotated is GSM8k's answer text with its calculator "
                                "annotations; this synthetic file has steps_eq / steps_nl only (use equation or nl)")
            opts["steps_field"] = "steps_eq" if cot_style == "equation" else "steps_nl"
        elif opts["steps_field"] not in obj and "cot" in obj:
            opts["steps_field"] = "cot"
    return read_jsonl(p, skips=skips, limit=limit, **opts)


# ----------------------------------------------------------------------------------------------------
# evaluation sets


@dataclass(frozen=True)
class EvalDataset:
    """Where an evaluation set lives locally and on the hub, and how big it must be."""

    name: str
    label: str
    local: str  # path relative to data_dir
    format: str
    hub_id: str | None
    hub_config: str | None
    hub_split: str | None
    expected: int | None


EVAL_DATASETS: dict[str, EvalDataset] = {
    "gsm8k": EvalDataset("gsm8k", "gsm8k test", "gsm8k/test.jsonl", "gsm8k", "openai/gsm8k", "main", "test", 1319),
    # The hub copy of GSM-Hard has a single `train` split holding all 1,319 problems.
    "gsm8k-hard": EvalDataset(
        "gsm8k-hard", "GSM-Hard", "gsm8k-hard/gsmhardv2.jsonl", "gsm_hard",
        "reasoning-machines/gsm-hard", None, "train", 1319,
    ),
    # ChilleD/SVAMP splits the 1,000 problems 700/300; the paper evaluates on all 1,000.
    "svamp": EvalDataset("svamp", "SVAMP", "svamp/SVAMP.json", "svamp", "ChilleD/SVAMP", None, "train+test", 1000),
    "gsm8k-aug-valid": EvalDataset(
        "gsm8k-aug-valid", "gsm8k-aug valid", "gsm8k-aug/valid.txt", "icot", "whynlp/gsm8k-aug", None, "validation", 500,
    ),
    **{
        f"synth-{s}": EvalDataset(f"synth-{s}", f"synthetic {s}", f"{s}.jsonl", "auto", None, None, None, None)
        for s in ("test", "hard", "varied", "valid")
    },
    # iCoT's published multiplication sets (`kava.data.multiplication`), local only
    **{
        f"mult{n}-{s}": EvalDataset(f"mult{n}-{s}", f"multiplication {n}x{n} {s}",
                                    f"multiplication/{n}x{n}/{'test_bigbench' if s == 'test' else s}.txt",
                                    "multiplication", None, None, None, 1000)
        for n in (4, 5, 7, 9) for s in ("valid", "test")
    },
}


def is_data_file(name: str) -> bool:
    """Whether an evaluation set name is a file to read with the readers' formats (not a named set)."""
    return name not in EVAL_DATASETS and (Path(name).suffix in (".jsonl", ".json", ".txt") or Path(name).is_file())


def hub_eval_spec(name: str) -> EvalDataset | None:
    """The evaluation set that a Hugging Face Hub dataset id names (`kava eval --datasets ID[:SPLIT]`), or None
    when `name` is no hub id (a named set, a data file, anything else). A named set's own hub id (and split, if
    given) is that set, read from the hub (`openai/gsm8k` is `gsm8k --hub`); any other id is read with its
    reader in `HUB_DATASETS` (else the one its columns suggest, `infer_schema`), split SPLIT (default test),
    and named `<org>__<name>[-<split>]` in eval/."""
    hub_id, _, split = name.partition(":")
    if name in EVAL_DATASETS or is_data_file(name) or not _HUB_ID_RE.fullmatch(hub_id):
        return None
    for spec in EVAL_DATASETS.values():
        if spec.hub_id and spec.hub_id.lower() == hub_id.lower() and split in ("", spec.hub_split):
            return spec
    label = hub_id.replace("/", "__") + (f"-{split}" if split else "")
    return EvalDataset(label, hub_id, "", "hub", hub_id, HUB_DATASETS.get(hub_id.lower(), (None, None))[1],
                       split or "test", None)


def eval_fields(path: Path, fields: dict | None) -> dict | None:
    """The `fields` mapping to read an evaluation file with: the given one (`kava eval --question-field`, ...),
    and no CoT field when the file has none (evaluation needs no CoT: a `{"question", "answer"}` file is read,
    not refused with "missing field: steps")."""
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    obj = _peek_object(path) or {}
    if "steps" not in fields and not any(k in obj for k in ("steps", "cot", "steps_eq", "steps_nl")):
        fields["steps"] = None
    return fields or None


def eval_set_path(name: str, data_dir: str | Path | None = None) -> Path:
    """The local file of a named evaluation set under `data_dir` (default ``$KAVA_DATA_DIR`` or ``./data``)."""
    spec = EVAL_DATASETS[name]
    root = Path(data_dir if data_dir is not None else os.environ.get("KAVA_DATA_DIR", "data"))
    path = root / spec.local
    if spec.name.startswith("synth-"):
        # the generated tasks write JSONL, multiplication writes iCoT lines (.txt); either under root or root/synthetic
        for cand in (path, path.with_suffix(".txt"), root / "synthetic" / spec.local,
                     (root / "synthetic" / spec.local).with_suffix(".txt")):
            if cand.exists():
                return cand
    return path


def check_eval_sets(names: Iterable[str], data_dir: str | Path | None = None, hub: bool = False, *,
                    synthetic_found: bool = False, fields: dict | None = None) -> None:
    """Refuse, before any model loads, an evaluation set that cannot be read: an unknown name, a missing file,
    a local set whose file is not under the data root, a synthetic set from the hub, field names (`fields`) for
    a named set. `synthetic_found`: the synth-* sets are found elsewhere (a synthetic-task run's own data), so
    their files are not checked."""
    names = list(names)
    if fields and (named := [n for n in names if n in EVAL_DATASETS]):
        raise DataError(f"--question-field / --answer-field / --steps-field apply to data files and hub datasets, "
                        f"not to the named set{'s' if len(named) > 1 else ''} {', '.join(named)}")
    unknown = [n for n in names if n not in EVAL_DATASETS and not is_data_file(n) and hub_eval_spec(n) is None]
    if unknown:
        raise DataError(f"unknown evaluation set{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"expected one of {sorted(EVAL_DATASETS)}, a .jsonl / .json / .txt file, or a Hugging "
                        "Face dataset id (org/name[:split])")
    for name in names:
        if name not in EVAL_DATASETS:
            if is_data_file(name):
                _check_file(name)
            continue  # a hub id: read from the hub
        spec = EVAL_DATASETS[name]
        if hub:
            if spec.hub_id is None:
                raise DataError(f"{name}: this set exists only locally (drop --hub, or give --data-dir)")
            continue
        if name.startswith("synth-") and synthetic_found and data_dir is None:
            continue
        path = eval_set_path(name, data_dir)
        if not path.exists():
            where = "--data-dir" if data_dir is not None else "$KAVA_DATA_DIR" if os.environ.get(
                "KAVA_DATA_DIR") else "the default data root ./data"
            shown = str(path) if path.is_absolute() else f"{path} = {path.absolute()}"
            raise DataError(f"{name}: {shown}: file not found (from {where}); give --data-dir DIR (the "
                            "../shared/data layout) or --hub")


def load_eval_dataset(
    name: str,
    data_dir: str | Path | None = None,
    hub: bool = False,
    *,
    skips: SkipLog | None = None,
    cot_style: str = "equation",
    fields: dict | None = None,
) -> tuple[list[Record], str]:
    """Records of a named evaluation set, of a data file (`name` is then its path, read in any of the
    readers' formats, detected as `load_records` does) or of a Hugging Face dataset (`name` is its id, with
    `:split`: `hub_eval_spec`), and a line naming the exact file/split and count.

    data_dir defaults to ``$KAVA_DATA_DIR`` or ``./data``. Synthetic splits are read from
    ``data_dir/<split>.jsonl`` (or ``data_dir/synthetic/<split>.jsonl``). A count that differs from the
    published size is flagged in the description rather than hidden.
    fields: for a JSON/JSONL file or a hub dataset, the columns to read (keys question, answer, steps; `kava
    eval --question-field ...`); a file or dataset without a CoT is read without one (evaluation needs none).
    """
    skips = SkipLog() if skips is None else skips
    fields = {k: v for k, v in (fields or {}).items() if v is not None} or None
    if name not in EVAL_DATASETS and is_data_file(name):
        fmt, why = detect_format_reason(_check_file(name))
        if fields and fmt not in ("jsonl", "gsm8k"):
            raise DataError(f"{name}: --question-field / --answer-field / --steps-field read JSON / JSONL files; "
                            f"this one is format {fmt}")
        if fields or fmt == "jsonl":  # the fields given, and no CoT field where the file has none
            fmt, why = "jsonl", why if not fields else f"fields {fields}"
            records = load_records(name, "jsonl", fields=eval_fields(Path(name), fields), skips=skips,
                                   cot_style=cot_style)
        else:
            records = load_records(name, fmt, skips=skips, cot_style=cot_style)
        desc = f"{name} (format {fmt}: {why}), {len(records)} problems"
        return records, desc + (f"; {skips.summary()}" if skips.total else "")
    check_eval_sets([name], data_dir, hub, synthetic_found=True, fields=fields)
    spec = hub_eval_spec(name) or EVAL_DATASETS[name]
    if hub or spec.format == "hub" or name not in EVAL_DATASETS:
        if fields is not None and "steps" not in fields:
            fields["steps"] = None  # evaluation needs no CoT
        records = read_hub(spec.hub_id, spec.hub_split or "test", config=spec.hub_config, fields=fields,
                           cot_style=cot_style, skips=skips)
        where = f"hub {spec.hub_id}" + (f" {spec.hub_config}" if spec.hub_config else "") + f", split {spec.hub_split}"
    else:
        path = eval_set_path(name, data_dir)
        records = load_records(path, spec.format, skips=skips, cot_style=cot_style)
        where = str(path)
    desc = f"{spec.label} ({where}), {len(records)} problems"
    if spec.expected is not None and len(records) != spec.expected:
        desc += f" (expected {spec.expected})"
    if skips.total:
        desc += f"; {skips.summary()}"
    return records, desc
