"""Validation-based stopping and the validation-curve summary of the pointer-chasing instrument (issue 22 §2).

    python experiments/pointer/watch.py watch RUN_DIR --pid PID [--stop-at 0.995] [--patience 4] [--min-delta 0.005]
                                              [--floor 0.9]
    python experiments/pointer/watch.py curves RUN_DIR [RUN_DIR ...]     # markdown: val accuracy by step, plateau

`watch` polls RUN_DIR/metrics.jsonl and sends SIGTERM to PID (the `timeout ... kava train` of that run) once
the validation accuracy has plateaued (`plateaued`) at or above --floor, or reached --stop-at (a curve flat
near zero before the induction-head transition is not a plateau to stop at). Stopping is safe: the trainer writes
best/ atomically at each validation improvement, and best/ is what `kava eval` reads. It exits when PID does.

The plateau rule, a pure function of the validation curve: at least `patience + 1` evaluations, and the best
of the last `patience` evaluations is no more than `min_delta` above the best before them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path


def val_curve(run: Path) -> list[tuple[int, float]]:
    """(step, val/accuracy) of a run's metrics.jsonl, in order; [] if there is none yet."""
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "val/accuracy" in row:
            out.append((int(row["step"]), float(row["val/accuracy"])))
    return out


def plateaued(vals: list[float], patience: int = 4, min_delta: float = 0.005) -> bool:
    """Whether the last `patience` values improve on the best before them by at most `min_delta`."""
    if len(vals) < patience + 1:
        return False
    return max(vals[-patience:]) <= max(vals[:-patience]) + min_delta


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_reason(vals: list[float], stop_at: float | None, patience: int, min_delta: float, floor: float) -> str | None:
    """Why the watcher stops a run with validation curve `vals` now, or None to let it train on."""
    if stop_at is not None and vals and vals[-1] >= stop_at:
        return f"val/accuracy {vals[-1]:.3f} >= {stop_at}"
    if patience > 0 and plateaued(vals, patience, min_delta) and max(vals) >= floor:
        return (f"plateau: best of the last {patience} evals {max(vals[-patience:]):.3f} <= best before "
                f"{max(vals[:-patience]):.3f} + {min_delta} (best >= floor {floor})")
    return None


def watch(run: Path, pid: int, stop_at: float | None, patience: int, min_delta: float, poll: float,
          floor: float = 0.9) -> str:
    """Poll until PID exits or the stop rule fires (then SIGTERM PID); returns why it ended."""
    while alive(pid):
        vals = [v for _, v in val_curve(run)]
        why = stop_reason(vals, stop_at, patience, min_delta, floor)
        if why:
            print(f"[watch {run.name}] stopping at eval {len(vals)}: {why}", flush=True)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return why
        time.sleep(poll)
    return "process ended"


def curves_md(runs: list[Path], patience: int = 4, min_delta: float = 0.005) -> str:
    lines = ["| run | evals | best val (step) | last val | plateau (last "
             f"{patience} evals ≤ best before + {100 * min_delta:.1f} pt) | val accuracy (%) by step |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        c = val_curve(run)
        if not c:
            lines.append(f"| {run.name} | 0 | – | – | – | – |")
            continue
        vals = [v for _, v in c]
        b = max(range(len(c)), key=lambda i: (vals[i], -i))
        pl = "yes" if plateaued(vals, patience, min_delta) else ("saturated" if vals[-1] >= 0.995 else "no")
        curve = ", ".join(f"{s}: {100 * v:.1f}" for s, v in c)
        lines.append(f"| {run.name} | {len(c)} | {100 * vals[b]:.1f} ({c[b][0]}) | {100 * vals[-1]:.1f} | {pl} | "
                     f"{curve} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("run")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--stop-at", type=float, default=None)
    w.add_argument("--patience", type=int, default=4, help="0: never stop on a plateau")
    w.add_argument("--min-delta", type=float, default=0.005)
    w.add_argument("--floor", type=float, default=0.9, help="stop on a plateau only at or above this accuracy")
    w.add_argument("--poll", type=float, default=5.0)
    c = sub.add_parser("curves")
    c.add_argument("runs", nargs="+")
    c.add_argument("--patience", type=int, default=4)
    c.add_argument("--min-delta", type=float, default=0.005)
    a = ap.parse_args()
    if a.cmd == "watch":
        print(f"[watch {Path(a.run).name}] {watch(Path(a.run), a.pid, a.stop_at, a.patience, a.min_delta, a.poll, a.floor)}",
              flush=True)
    else:
        print(curves_md([Path(r) for r in a.runs], a.patience, a.min_delta), end="")


if __name__ == "__main__":
    main()
