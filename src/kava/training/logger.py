"""The metric logger of a run (torchtune's shape: `log(payload, step)`, `close`): JSONL always, plus
TensorBoard, W&B and stdout backends; it writes on the main process only. Tests read the JSONL.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from kava.checkpoint.rundir import RunDir


class MetricLogger:
    """JSONL (always) + TensorBoard + W&B + stdout backends; writes on the main process only."""

    def __init__(self, run_dir: Path, backends: list[str], enabled: bool, cfg):
        self.enabled = enabled
        self.path = RunDir(run_dir).metrics
        self.tb = self.wandb = None
        self.stdout = "stdout" in backends
        if not enabled:
            return
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter  # an opt-in backend (run.log), slow to import

            self.tb = SummaryWriter(str(RunDir(run_dir).tb))
        if "wandb" in backends:
            self.wandb = wandb_init(run_dir, cfg)

    def log(self, payload: dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **payload}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # e.g. disk full: Python's message would not say which file
            raise OSError(f"could not append to {self.path}: {e} (disk full?); the last checkpoint is intact: "
                          f"free space, then `kava train --resume {self.path.parent}`") from e
        for k, v in payload.items():
            if isinstance(v, (int, float)) and self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(payload, step=step)
        if self.stdout:
            print(json.dumps(row))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so metrics equal an uninterrupted run's."""
        if not self.enabled or not self.path.exists():
            return
        def kept(ln: str) -> bool:
            try:
                return json.loads(ln)["step"] <= step
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill or a full disk
                return False

        keep = [ln for ln in self.path.read_text(errors="replace").splitlines() if ln.strip() and kept(ln)]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_init(run_dir: Path, cfg):
    """Start (or, when the run dir already names one, continue) the run's W&B run: `run.wandb_project`,
    `run.wandb_entity`, `run.wandb_tags`. The id is written before `wandb.init`, so a run killed at any
    point resumes into the same W&B run. Steps that a resumed run logs again (those after its checkpoint)
    are ones W&B already holds with the same values (resume is exact); W&B keeps the first copy."""
    import wandb  # optional (`pip install wandb`); a missing package is a one-line user error (`kava.cli.user_errors`)

    path = RunDir(run_dir).wandb  # the W&B run id, so that `--resume` continues the same W&B run
    if path.exists():
        run_id = json.loads(path.read_text())["id"]
    else:
        run_id = secrets.token_hex(8)  # W&B ids: letters and digits
        path.write_text(json.dumps({"id": run_id, "project": cfg.run.wandb_project, "entity": cfg.run.wandb_entity}))
    return wandb.init(project=cfg.run.wandb_project, entity=cfg.run.wandb_entity, tags=list(cfg.run.wandb_tags),
                      name=run_dir.name, id=run_id, resume="allow", config=cfg.to_dict(), dir=str(run_dir))
