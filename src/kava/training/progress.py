"""What `kava train` tells the person watching: the start summary and, without a progress bar, progress lines.

The start summary (also the plan of `kava train --dry-run`) names the run dir, method, model, data counts
and skips, steps, effective batch = micro-batch x processes x accumulation, and the world size. When the
tqdm bar is not shown (no TTY: SLURM, nohup, a pipe; or `--no-progress`), `ProgressLine` prints one line
every `run.log_every` optimizer steps instead:

    [kava] step 40/400 (10%) | loss 1.2345 | 2.50 steps/s | ETA 2m24s

Each validation prints a line, bar or no bar (`validation_line`, above the bar: `kava.console.print_line`):

    [kava] step 400: val accuracy 0.4120 (best 0.4300 at step 200)
"""

from __future__ import annotations

import time
from pathlib import Path

from kava import curriculum
from kava.checkpoint.rundir import RunDir
from kava.console import Ticker, print_line


def describe_model(cfg) -> str:
    model = cfg.model.name_or_path or (f"init_from {cfg.model.init_from}" if cfg.model.init_from else "from_scratch")
    if cfg.model.gguf_file:
        model += f" ({cfg.model.gguf_file})"
    return model


def plan_lines(cfg, plan, *, run_dir: Path, world: int, data_desc: str, train_desc: str, n_valid: int,
               valid_skips=None) -> list[str]:
    """The plan, one `  key: value` line each: run dir, method, model, data, train counts and skips,
    validation count and skips, steps, batch and accumulation, world size."""
    fine_tune = f"LoRA r={cfg.lora.r}" if cfg.lora is not None else "full fine-tuning"
    return [
        f"  run dir:          {run_dir}",
        f"  method:           {cfg.method} ({fine_tune})"
        + (f"; derived: {', '.join(cfg.derived)}" if cfg.derived else ""),
        f"  model:            {describe_model(cfg)}",
        f"  data:             {data_desc}",
        f"  train:            {train_desc}",
        f"  validation:       {n_valid} records" + (f"; {valid_skips.summary()}" if valid_skips is not None else ""),
        f"  steps:            {plan.total_steps} ({plan.steps_per_epoch} per epoch, warmup {plan.warmup_steps})",
        f"  batch:            effective {cfg.optim.effective_batch} = micro {cfg.optim.micro_batch} x "
        f"{world} process(es) x {plan.accum} accumulation",
        f"  world size:       {world}",
    ] + ([f"  curriculum:       {c.describe()}"] if (c := curriculum.for_config(cfg, plan.steps_per_epoch)) else [])


def start_summary(cfg, plan, *, run_dir: Path, world: int, data_desc: str, n_records: int, n_examples: int,
                  skips, n_valid: int, start_step: int = 0, valid_skips=None) -> list[str]:
    """The lines `kava train` prints before its first step."""
    head = f"[kava] train {cfg.method}: " + (f"resuming at step {start_step} of {plan.total_steps}"
                                               if start_step else f"{plan.total_steps} steps")
    train_desc = (f"{n_examples} examples (of {n_records} records, after the length limits); "
                  f"{skips.summary()}" + (f" (where: {RunDir(run_dir).skips})" if skips.total else ""))
    return [head] + plan_lines(cfg, plan, run_dir=run_dir, world=world, data_desc=data_desc, train_desc=train_desc,
                               n_valid=n_valid, valid_skips=valid_skips)


class ProgressLine:
    """One line per logged step when no progress bar is shown: step/total, loss, steps/s, ETA.

    steps/s is measured over the steps since the previous line (validation and checkpoint time included, as
    a wall-clock ETA should); the first line measures from the start of the loop.
    """

    def __init__(self, total: int, start_step: int, enabled: bool, clock=time.perf_counter):
        self.total, self.enabled = total, enabled
        self.ticker = Ticker(total, start_step, since="line", clock=clock)

    def line(self, step: int, loss: float) -> str:
        rate, eta = self.ticker.read(step)
        return (f"[kava] step {step}/{self.total} ({100 * step / self.total:.0f}%) | loss {loss:.4f} | "
                f"{rate:.2f} steps/s | ETA {eta}")

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            print_line(self.line(step, loss))


def validation_line(step: int, accuracy: float, best: dict, digits: float | None = None) -> str:
    """The line of a validation after optimizer step `step`; `best`: the run's best so far (`Trainer.best`,
    this validation included); `digits`: for digit answers, the share of digits in place (`val/digits`)."""
    return (f"[kava] step {step}: val accuracy {accuracy:.4f}" + (f", digits {digits:.4f}" if digits is not None else "")
            + f" (best {best['val/accuracy']:.4f} at step {best['step']})")
