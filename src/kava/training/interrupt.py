"""Graceful interrupts: Ctrl-C (SIGINT) or SIGTERM (what SLURM sends at the time limit or on `scancel`) asks
training to stop at the next step boundary, where it saves a checkpoint and says how to resume.

`StopRequest` is a context manager the training loop runs inside: once armed (the loop starts), its
handlers only set a flag (a second signal, or one during the set-up, stops at once, as Python's default would); `should_stop` reads it at a step boundary, agreed over all
processes under DDP so that every rank saves and stops at the same step. `TrainingInterrupted` is what
`kava.train.train` then raises: a `KeyboardInterrupt`, so a sweep stops too; the CLI prints its message and
exits with 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from kava.checkpoint.rundir import RunDir

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; the message names it and the resume command."""

    def __init__(self, signum: int, run_dir: Path, step: int, total: int):
        self.signum, self.run_dir, self.step = signum, run_dir, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step} of {total}; checkpoint saved in "
                         f"{RunDir(run_dir).step(step)}; continue with: kava train --resume {run_dir}")

    def __str__(self) -> str:
        return self.args[0]


class StopRequest:
    """SIGINT / SIGTERM -> `requested` (the first signal's number); restored handlers on exit. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self.armed = False  # before the loop (set-up: data, model) a signal stops at once, as by default
        self._previous: dict[int, object] = {}

    def arm(self) -> None:
        """From now on (the training loop) a signal waits for the next step boundary."""
        self.armed = True

    def _handle(self, signum, frame) -> None:
        if not self.armed:
            raise KeyboardInterrupt
        if self.requested is not None:  # a second signal: stop now
            for s, h in self._previous.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n[kava] {signal.Signals(signum).name} received: saving a checkpoint after this step, then "
              "stopping (send it again to stop at once)", flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self, acc) -> int | None:
        """The signal to stop on, decided at a step boundary: any process's, the same on every rank."""
        if acc.num_processes == 1:
            return self.requested
        got = torch.tensor([self.requested or 0], device=acc.device)
        return int(acc.reduce(got, reduction="max").item()) or None
