"""The run directory itself: its name, the lock that keeps a second trainer out, and meta.json's provenance.

A run directory (`kava.train` writes it):

    config.yaml  resolved config          meta.json     versions, git revision, method, data, seed, skips
    skips.json   skipped records          metrics.jsonl one JSON object per logged step (train and val)
    tb/          TensorBoard              checkpoints/step_<n>/  the training state (`kava.checkpoint.state`)
    best/, final/  loadable models (`kava.checkpoint.saved`)  DONE  written when the run finished
    wandb.json   the W&B run id           train.lock    while a `kava train` runs in it (`RunLock`)
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import peft
import torch
import transformers

from kava import __version__

LOCK_FILE = "train.lock"


def run_name(cfg) -> str:
    """The run directory's name: `run.name`, else `<preset or method>-s<seed>`."""
    return cfg.run.name or f"{cfg.preset or cfg.method}-s{cfg.run.seed}"


def git_revision() -> str | None:
    """The checkout's commit (`-dirty` with uncommitted changes), or None outside a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    return {"kava": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


class RunLocked(OSError):
    """Another `kava train` holds the run directory."""

    def __init__(self, run_dir: Path, holder: str):
        super().__init__(f"{run_dir} is in use by another `kava train` ({holder}); wait for it to finish or stop "
                         f"it, then `kava train --resume {run_dir}`")


def lock_holder(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock ("pid N on HOST since T"), or None when no trainer runs in it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return path.read_text(errors="replace").strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run directory while a trainer writes it: a second `kava train` (or `--resume`)
    on the same directory fails at once with `RunLocked`, naming the holder. It is an advisory `flock` on
    `train.lock`, released by the kernel when the process dies (a killed run leaves no stale lock); the file
    is removed on `release`. Only the main process of a multi-process run takes it (`enabled`); use it as a
    context manager or call `release`."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = None
        if not enabled:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.path.read_text(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunLocked(run_dir, holder) from None
            try:  # the holder before us may have removed the file between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
