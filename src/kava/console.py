"""Console progress, for training and evaluation alike: durations, lines printed above a tqdm bar, and the
rate and ETA of a count of work (`Ticker`).

The lines themselves belong to their users (`kava.training.progress.ProgressLine`,
`kava.evaluate.EvalProgress`); both print one only where no bar is drawn (no TTY: SLURM, nohup, a pipe).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 145 -> '2m25s', 7.4 -> '7s'."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def print_line(line: str) -> None:
    """Print `line` on stdout, flushed; above tqdm's bar when one is drawn (it is not broken)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class Ticker:
    """Rate (units per second) and ETA of `total` units of work, one reading per printed line.

    since="line": the rate over the units since the previous reading (the first: since the start), so a
    wall-clock ETA follows pauses as they come; since="start": over every unit since the start.
    """

    def __init__(self, total: int, done: int = 0, *, since: str = "line", clock=time.perf_counter):
        if since not in ("line", "start"):
            raise ValueError(f"since={since!r}; allowed values: line, start")
        self.total, self.since, self.clock = total, since, clock
        self.start_t = self.last_t = clock()
        self.start_done = self.last_done = done

    def since_last(self, done: int, now: float) -> tuple[int, float]:
        """(units, seconds) since the previous reading: whether a line is due."""
        return done - self.last_done, now - self.last_t

    def read(self, done: int, now: float | None = None) -> tuple[float, str]:
        """(units per second, ETA text or "?") at `done` units (`now`: a clock reading already taken); this
        becomes the previous reading."""
        now = self.clock() if now is None else now
        d0, t0 = (self.last_done, self.last_t) if self.since == "line" else (self.start_done, self.start_t)
        rate = (done - d0) / max(now - t0, 1e-9)
        self.last_done, self.last_t = done, now
        return rate, format_duration((self.total - done) / rate) if rate > 0 else "?"
