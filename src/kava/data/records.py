"""The one record type every reader produces, and the skip ledger every reader reports to.

A reader never drops a record silently: a bad record is either counted under a reason in a `SkipLog`
(the default) or raises `DataError` naming the file and line (``strict=True``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Record:
    """One reasoning problem.

    question: the problem text.
    steps: the chain of thought as a list of steps (equations ``<<a=b>>`` or sentences); may be empty
        for evaluation-only sources (GSM8k-Hard, SVAMP).
    answer: the final answer as a string, normalised (no thousands separators), e.g. ``"18"``, ``"-3.5"``;
        for ``answer_kind="digits"`` the digit string as written (``"5 5 6 0 8 2 0 1"``).
    source: where it came from, ``"<file or hub id>:<line or index>"``, for error messages and analysis.
    answer_kind: how a generated answer is scored (`kava.scoring.ANSWER_KINDS`): ``"number"`` (numeric match) or
        ``"digits"`` (exact match of the digit sequence: iCoT's multiplication, `kava.data.multiplication`).
    index: its place among the entries of its file or hub split, 0-based, skipped entries counted (a JSON
        array's element, a text file's non-blank line): the index `kava eval` writes and `kava score` reads.
        None for a record built by hand; not part of equality.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    source: str = ""
    answer_kind: str = "number"
    index: int | None = field(default=None, compare=False)


class DataError(ValueError):
    """A bad record in strict mode, or an unreadable source. The message names the file and line."""


@dataclass
class SkipLog:
    """Counts skipped records by reason; keeps a few examples of each for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    strict: bool = False
    max_examples: int = 3

    def skip(self, reason: str, where: str) -> None:
        """Record a skip of the record at `where` for `reason`; in strict mode raise instead."""
        if self.strict:
            raise DataError(f"{where}: {reason} (strict mode; set data.strict=false to skip and count such records)")
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipLog") -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(v[: max(0, self.max_examples - len(mine))])

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 records"
        parts = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        return f"skipped {self.total} records ({parts})"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2))
