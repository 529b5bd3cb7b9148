"""The run directory: the one place that names its files, reads them back, and extends a run; its name, the
lock that keeps a second trainer out, and meta.json's provenance.

A run directory (`kava.train` writes it; `RunDir(path)` names each file):

    config.yaml  resolved config          meta.json     versions, git revision, method, data, seed, skips
    skips.json   skipped records          metrics.jsonl one JSON object per logged step (train and val)
    tb/          TensorBoard              checkpoints/step_<n>/  the training state (`kava.checkpoint.state`),
                                                        its counters in state.json (`read_state`)
    best/, final/  loadable models (`kava.checkpoint.saved`)  DONE  written when the run finished
    tokenizer_src/ the tokenizer a from-scratch run trains for itself (`own_tokenizer`)
    eval/<dataset>/  `kava eval`'s predictions and summary      wandb.json  the W&B run id
    train.lock   while a `kava train` runs in it (`RunLock`)

No other module spells these names (tests/test_rundir.py checks the source). The module imports no third-party
library at its top, so that `kava report` (which only reads run directories) stays quick to start.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kava import __version__

# ------------------------------------------------------------------------------------------------ the files
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
SKIPS_FILE = "skips.json"
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "DONE"
TOKENIZER_DIR = "tokenizer_src"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"  # checkpoints/step_<n>/
STATE_FILE = "state.json"  # in checkpoints/step_<n>/: step, method, model and tokenizer identity, best, ...
BEST_DIR = "best"
FINAL_DIR = "final"
EVAL_DIR = "eval"
TB_DIR = "tb"
WANDB_FILE = "wandb.json"
LOCK_FILE = "train.lock"


class RunDir:
    """A run directory's files (paths; nothing is created) and the reads of them that more than one module
    needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG_FILE)
    meta = property(lambda self: self.path / META_FILE)
    skips = property(lambda self: self.path / SKIPS_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    done = property(lambda self: self.path / DONE_FILE)
    tokenizer_src = property(lambda self: self.path / TOKENIZER_DIR)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)
    best = property(lambda self: self.path / BEST_DIR)
    final = property(lambda self: self.path / FINAL_DIR)
    eval = property(lambda self: self.path / EVAL_DIR)
    tb = property(lambda self: self.path / TB_DIR)
    wandb = property(lambda self: self.path / WANDB_FILE)
    lock = property(lambda self: self.path / LOCK_FILE)

    def step(self, n: int) -> Path:
        """`checkpoints/step_<n>`, the training checkpoint after optimizer step n."""
        return self.checkpoints / f"{STEP_PREFIX}{n}"

    def step_dirs(self) -> list[Path]:
        """The `checkpoints/step_<n>` directories (complete or not), by step."""
        return sorted((p for p in self.checkpoints.glob(f"{STEP_PREFIX}*") if step_of(p) is not None), key=step_of)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete training checkpoint (one with its state.json), or None."""
        done = [p for p in self.step_dirs() if (p / STATE_FILE).exists()] if self.checkpoints.exists() else []
        return done[-1] if done else None

    def started(self) -> bool:
        """Whether a run was started here (its config.yaml is written first)."""
        return self.config.exists()

    def finished(self) -> bool:
        return self.done.exists()

    def read_done(self) -> dict | None:
        """DONE's record of a finished run (steps, best, skips), or None for an unfinished one."""
        return json.loads(self.done.read_text()) if self.done.exists() else None

    def read_meta(self) -> dict:
        """meta.json, or {} when the run has none yet."""
        return json.loads(self.meta.read_text()) if self.meta.exists() else {}

    def saved_step(self, which: str) -> int | None:
        """The training step of the run's `best/` or `final/` model now (`saved_step`), None when it has none."""
        return saved_step(self.path / which)

    def stale_eval(self, summary: dict) -> str | None:
        """Why an evaluation of this run (an `eval/<set>/summary.json`) is not of the run's model any more, or
        None: it evaluated `best/` or `final/` at a step ("checkpoint_name", "model_step") and that directory
        now holds another step (the run was extended, or a later validation was better), or no longer exists.
        Evaluations of a training checkpoint, an export or a plain model are of a fixed model (None), and so is
        one that did not record its step (`kava eval` before it did): that cannot be told (None)."""
        which, step = summary.get("checkpoint_name"), summary.get("model_step")
        if summary.get("model_kind", "run") != "run" or which not in (BEST_DIR, FINAL_DIR) or step is None:
            return None
        now = self.saved_step(which)
        if now == step:
            return None
        return (f"evaluated {which}/ at step {step}; {which}/ is now "
                + (f"the model of step {now}" if now is not None else "gone"))

    def tokenizer_dir(self, cfg) -> str | None:
        """Where this run's tokenizer is built (`tokenizer_src/`) when it trains its own (`own_tokenizer`), else
        None (the config names it): the `tokenizer_dir` of `kava.checkpoint.load.load_tokenizer`."""
        return str(self.tokenizer_src) if own_tokenizer(cfg) else None

    def extend(self, cfg, *, before: int, at: int, main: bool = True) -> None:
        """Extend the run to `cfg.optim.max_steps` steps (`kava train --resume RUN --set optim.max_steps=N`): under
        its lock (a run in use is refused untouched, `RunLocked`), the main process rewrites config.yaml with
        `cfg`, removes DONE and records `{from_steps: before, to_steps, at_step: at}` under meta.json's
        "extended". `train` takes the lock again after."""
        with RunLock(self.path, enabled=main):
            if main:
                self.config.write_text(cfg.to_yaml())  # `kava.config.save_config`
                self.done.unlink(missing_ok=True)
                meta = self.read_meta()
                if meta:
                    meta.setdefault("extended", []).append({"from_steps": before, "to_steps": cfg.optim.max_steps,
                                                            "at_step": at})
                    self.meta.write_text(json.dumps(meta, indent=2))


def step_of(ck: str | Path) -> int | None:
    """n of a `step_<n>` directory name, else None."""
    name = Path(ck).name
    n = name[len(STEP_PREFIX):]
    return int(n) if name.startswith(STEP_PREFIX) and n.isdigit() else None


def saved_step(ck: str | Path) -> int | None:
    """The training step of a saved model (`best/`, `final/`: the "step" of its meta.json,
    `kava.checkpoint.saved.META_FILE`), None when it has none."""
    try:
        step = json.loads((Path(ck) / META_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def read_state(ck: str | Path) -> dict:
    """state.json of training checkpoint `ck` (`checkpoints/step_<n>`): step, method, model, tokenizer, best,
    non-finite skips, the optimizer's scalars."""
    return json.loads((Path(ck) / STATE_FILE).read_text())


def own_tokenizer(cfg) -> bool:
    """Whether a run trains its own tokenizer (into `tokenizer_src/`): a model built from scratch, with neither
    `model.tokenizer` nor `model.init_from` to take one from."""
    m = cfg.model
    return m.from_scratch is not None and not m.tokenizer and not m.init_from


def run_dir_of(ck: str | Path) -> Path:
    """The run directory a checkpoint belongs to (its best/ or final/, or a training checkpoint
    `checkpoints/step_<n>/`); the checkpoint itself when it stands alone."""
    ck = Path(ck)
    if ck.parent.name == CHECKPOINTS_DIR and RunDir(ck.parent.parent).started():
        return ck.parent.parent
    return ck.parent if RunDir(ck.parent).started() else ck


# ------------------------------------------------------------------------------------------------ provenance
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
    """The versions meta.json records (the libraries are imported here, not at the module's top: see above)."""
    import accelerate
    import peft
    import torch
    import transformers

    return {"kava": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


# ------------------------------------------------------------------------------------------------ the lock
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
