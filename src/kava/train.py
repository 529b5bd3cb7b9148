"""The training recipe: one trainer for every method of `kava.spec` (SPEC §5).

`train()` composes named stages, as a torchtune recipe does; each is a function testable on its own:
    setup_accelerator           the `Accelerator` (DDP, bf16 autocast), world size checked, seeds set
    setup_run_dir               refuse to overwrite a run; find and check the checkpoint to resume; then
                                `train()` locks the directory (`kava.checkpoint.rundir.RunLock`)
    setup_data                  records, tokenizer, tokenized examples, skip accounting -> `Data`
    setup_model_and_optimizer   reasoner, AdamW, `kava.objective.Objective`, prepared by accelerate -> `Trainer`
    resume_state                a checkpoint into the `Trainer` (weights, optimizer, RNGs, counters)
    save_run_files              a new run's config.yaml, meta.json, skips.json
    prepare_step                an optimizer step's host half: its micro-batches, built on the CPU
    run_step                    its device half: loss / accumulation, non-finite check, clip, step -> `StepResult`
    train_step                  prepare_step then run_step
    validate, save_best, save_checkpoint, save_final
The loop in `train()` then reads top to bottom like nanoGPT's: lr for this step -> run_step (which builds the
next step's host half before its one sync) -> (non-finite: run.nan_policy) -> log -> validate / checkpoint.
Plumbing (DDP, autocast, no-sync) is `accelerate`'s.

The components live elsewhere: the loss (`kava.objective`), the run directory, its lock and provenance
(`kava.checkpoint.rundir`, whose docstring lists the files), the training state (`kava.checkpoint.state`),
saved models (`kava.checkpoint.saved`), the metric logger (`kava.training.logger`), CUDA graphs
(`kava.training.graphs`), gradient shares (`kava.training.gradshare`) and the printed summary
(`kava.training.progress`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from kava import curriculum
from kava.checkpoint.load import build_reasoner, load_tokenizer
from kava.checkpoint.rundir import (STATE_FILE, RunDir, RunLock, RunLocked, git_revision, lock_holder, own_tokenizer,
                                    read_state, run_name, step_of, versions)
from kava.checkpoint.saved import save_model
from kava.checkpoint.state import (atomic_dir_write, check_resume_state, check_tokenizer, gather_rng,
                                   latest_checkpoint, read_checkpoint, restore_generator, restore_rng, rng_of_rank,
                                   rng_tensors, tokenizer_identity, write_checkpoint, model_identity)
from kava.config import (Config, ConfigError, check_launcher_precision, check_world_size, load_config, parse_override,
                         save_config, use_bf16)
from kava.console import print_line
from kava.data.format import Formatter, Tokenized
from kava.data.pipeline import load_train_valid, synthetic_single_tokens, train_data_label
from kava.data.records import Record, SkipLog
from kava.data.tokenizer import build_tokenizer, tokenizer_texts
from kava.evaluate import evaluate_records, teacher_forced_accuracy
from kava.objective import Batch, Objective, ce_denominators, length_key, make_batch
from kava.scoring import place_accuracy
from kava.training.gradshare import grad_share_due, grad_share_micro, measure
from kava.training.graphs import GraphedStep, batch_volume, setup_graphs
from kava.training.interrupt import StopRequest, TrainingInterrupted
from kava.training.logger import MetricLogger
from kava.training.progress import ProgressLine, plan_lines, start_summary, validation_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class NonFiniteLoss(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ schedule
TOKENIZER_RECORDS = 200_000  # a from-scratch run's tokenizer learns from the first ones (808k take minutes)


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / linear / constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    accum: int


def make_plan(cfg: Config, n_train: int, world: int) -> Plan:
    accum = check_world_size(cfg, world)
    if world > 1 and n_train < cfg.optim.effective_batch:
        # a short epoch gives fewer micro-batches than processes: a rank without one would crash while the
        # others wait in the gradient all-reduce
        raise ValueError(f"{n_train} training examples are fewer than optim.effective_batch="
                         f"{cfg.optim.effective_batch} with {world} processes: lower optim.effective_batch "
                         "or add data")
    spe = max(1, n_train // cfg.optim.effective_batch)
    total = cfg.optim.max_steps or max(1, int(round(cfg.optim.epochs * spe)))
    return Plan(spe, total, int(cfg.optim.warmup_ratio * total), accum)


@functools.lru_cache(maxsize=2)  # the loop asks every step; a 385k-example permutation costs ~30 ms
def example_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Shuffle for one epoch; a pure function of (seed, epoch), so resume needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(cfg: Config, plan: Plan, n: int, step: int) -> tuple[int, ...]:
    """Example indices of optimizer step `step` (0-based): the next `optim.effective_batch` of its epoch's
    shuffle."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    eb = cfg.optim.effective_batch
    return example_order(n, cfg.run.seed, epoch)[within * eb:(within + 1) * eb]


# ------------------------------------------------------------------------------------------------ stages
def setup_accelerator(cfg: Config) -> Accelerator:
    """The `Accelerator` (DDP, bf16 autocast on GPU), a launcher's --mixed_precision and the world size checked
    against the config before any data or model is read, and the seeds set."""
    # methods without a latent student (cot, nocot) never touch the projection or the special-token rows:
    # DDP must be told
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not cfg.spec.latent)
    check_launcher_precision(cfg, os.environ.get("ACCELERATE_MIXED_PRECISION"), torch.cuda.is_available())
    acc = Accelerator(mixed_precision="bf16" if use_bf16(cfg) else "no", cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[ddp])
    check_world_size(cfg, acc.num_processes)  # before reading (and tokenizing) the data or loading a model
    set_seed(cfg.run.seed, deterministic=cfg.run.deterministic)
    return acc


def setup_run_dir(cfg: Config, resume: str | Path | None, main: bool) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None). Refuses to overwrite a run, checks the directory is
    writable, and checks a resume's checkpoint against `cfg` — all before any data or model is loaded."""
    run_dir = Path(resume) if resume else Path(cfg.run.output_dir) / run_name(cfg)
    rd = RunDir(run_dir)
    # before any other check, say what is going on (the main process only: the others would see its own lock)
    if main and (holder := lock_holder(run_dir)) is not None:
        raise RunLocked(run_dir, holder)
    if not resume and rd.started():
        if rd.finished():
            raise FileExistsError(f"{run_dir} holds a finished run; choose another run.name or delete it")
        raise FileExistsError(f"{run_dir} holds an unfinished run; continue it with `kava train --resume {run_dir}`")
    if resume and not rd.started():
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (no {rd.config.name}: not a kava run "
                                "directory)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks probe the same directory at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the output directory {run_dir}: {e}") from e
    # a run killed before its first checkpoint starts over (from step 0 the result equals an uninterrupted run)
    resume_ck = latest_checkpoint(run_dir) if resume else None
    if resume and resume_ck is None and main:
        print(f"[kava] {run_dir}: no checkpoint yet (stopped before the first one); starting from step 0")
    if resume_ck is not None:
        check_resume_state(read_state(resume_ck), cfg, resume_ck)
    return run_dir, resume_ck


@dataclass
class Data:
    """What `setup_data` returns."""

    train_recs: list[Record]
    valid_recs: list[Record]
    desc: str  # where both came from (start summary, meta.json)
    skips: SkipLog  # training records skipped, by reason (skips.json)
    tokenizer: PreTrainedTokenizerBase
    items: list[Tokenized]  # the usable training examples
    no_cot: int  # how many of them have an empty CoT (kept)
    valid_skips: SkipLog = field(default_factory=SkipLog)  # validation records skipped (skips.json "validation")


def setup_data(cfg: Config, run_dir: Path, acc: Accelerator, *, data_root: str | Path | None = None,
               resume_ck: Path | None = None) -> Data:
    """Records, the tokenizer (trained into `run_dir/tokenizer_src` for a from-scratch model without one),
    and the tokenized training examples. Refuses data with no usable record, or with no CoT at all for a
    method that learns from it; a resume refuses a tokenizer that changed since its checkpoint."""
    main = acc.is_main_process
    skips, valid_skips = SkipLog(strict=cfg.data.strict), SkipLog()
    root = Path(data_root) if data_root else Path(cfg.run.output_dir) / "_data"
    train_recs, valid_recs, data_desc = load_train_valid(cfg, root, skips, valid_skips)
    if own_tokenizer(cfg):
        tok_dir = RunDir(run_dir).tokenizer_src
        if not (tok_dir / "tokenizer_config.json").exists() and main:
            texts = tokenizer_texts(train_recs[:TOKENIZER_RECORDS], cfg.data.answer_prompt)
            atomic_dir_write(tok_dir, lambda d: build_tokenizer(texts, d, vocab_size=cfg.data.tokenizer_vocab_size,
                                                                 single_tokens=synthetic_single_tokens(cfg)))
        acc.wait_for_everyone()
        tokenizer = load_tokenizer(cfg, str(tok_dir))
    else:
        tokenizer = load_tokenizer(cfg)
    if resume_ck is not None:  # the special rows were trained for these ids: the tokenizer must not have changed
        check_tokenizer(resume_ck, tokenizer, "; the trained special-token rows and embeddings would meet other ids")
    items = Formatter.from_config(cfg, tokenizer).tokenize_all(train_recs, skips)
    if not items:
        raise ValueError(f"no usable training records ({skips.summary()})")
    # An empty CoT is legitimate (a one-step solution loses its only step to data.drop_last_step: 17-21% of the
    # GSM8k-Aug problems), so such examples are kept, counted and reported; data in which *no* example has a
    # CoT (a wrong data.steps_field, an evaluation file) would train a CoT method on nothing: refuse it.
    no_cot = sum(1 for it in items if not it.cot)
    if cfg.spec.teacher_cot and no_cot:
        if no_cot == len(items):
            raise ValueError(f"none of the {len(items)} training examples has a CoT (data.drop_last_step="
                             f"{cfg.data.drop_last_step}); method {cfg.method!r} learns from it: check "
                             f"data.steps_field / data.source, or use method nocot")
        if main:
            print(f"[kava] {no_cot} of {len(items)} training examples have an empty CoT "
                  f"(data.drop_last_step={cfg.data.drop_last_step}); kept, counted in meta.json")
    return Data(train_recs, valid_recs, data_desc, skips, tokenizer, items, no_cot, valid_skips)


def print_start_summary(cfg: Config, plan: Plan, run_dir: Path, data: Data, world: int,
                        resume_ck: Path | None) -> None:
    """What `kava train` prints before the model loads (kava.training.progress.start_summary)."""
    start = read_state(resume_ck)["step"] if resume_ck is not None else 0
    print("\n".join(start_summary(cfg, plan, run_dir=run_dir, world=world, data_desc=data.desc,
                                  n_records=len(data.train_recs), n_examples=len(data.items), skips=data.skips,
                                  n_valid=len(data.valid_recs), start_step=start, valid_skips=data.valid_skips)),
          flush=True)


@dataclass
class Trainer:
    """What the loop carries (a torchtune recipe's attributes): the prepared objective and optimizer, the
    model they train, and the counters a checkpoint stores with the weights."""

    cfg: Config
    acc: Accelerator
    objective: torch.nn.Module  # `Objective`, as accelerate prepared it (DDP-wrapped on several processes)
    opt: torch.optim.Optimizer  # AdamW, as accelerate prepared it
    raw: torch.nn.Module  # the LatentReasoner inside `objective`
    tokenizer: PreTrainedTokenizerBase
    step: int = 0  # optimizer steps taken (skipped non-finite ones included)
    best: dict = field(default_factory=lambda: {"val/accuracy": -1.0, "step": -1})
    nonfinite_skipped: int = 0
    graphs: GraphedStep | None = None  # CUDA graphs of the micro-step (`optim.cuda_graphs`)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def inner_opt(self) -> torch.optim.Optimizer:
        return self.opt.optimizer if hasattr(self.opt, "optimizer") else self.opt

    def rng_now(self) -> dict[str, torch.Tensor]:
        """Every RNG state a resume must restore: torch (CPU, CUDA) and the random-eviction generator."""
        rng = rng_tensors()
        rng["eviction"] = self.acc.unwrap_model(self.objective).generator.get_state()
        return rng

    def counters(self) -> dict:
        """What state.json stores besides the tensors (`kava.checkpoint.state.write_checkpoint`)."""
        return {"step": self.step, "method": self.cfg.method, "model": model_identity(self.cfg),
                "tokenizer": tokenizer_identity(self.tokenizer), "best": self.best,
                "nonfinite_skipped": self.nonfinite_skipped}


def setup_model_and_optimizer(cfg: Config, tokenizer, acc: Accelerator) -> Trainer:
    """The reasoner, AdamW (no weight decay on vectors and the special rows), the `Objective` around the model,
    both prepared by accelerate; `Trainer.step` 0."""
    # Frozen LoRA base weights live in bf16 on GPU (adapters, projection and special rows stay fp32);
    # full fine-tuning keeps fp32 master weights under bf16 autocast.
    base_dtype = torch.bfloat16 if use_bf16(cfg) and cfg.lora is not None else torch.float32
    model = build_reasoner(cfg, tokenizer, dtype=base_dtype)  # (pause tokens: the projection frozen there)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and n != "special_rows" else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            **({"fused": True} if cfg.optim.fused_adamw else {}))
    objective = Objective(model, cfg)
    # random eviction draws on the model's device, so its generator must live there too
    objective.generator = torch.Generator(device=acc.device).manual_seed(cfg.run.seed)
    objective, opt = acc.prepare(objective, opt)
    raw = acc.unwrap_model(objective).model
    if cfg.optim.compile:
        raw.compile_layers()
    t = Trainer(cfg, acc, objective, opt, raw, tokenizer)
    t.graphs = setup_graphs(cfg, acc, raw)
    return t


def resume_state(t: Trainer, ck: Path) -> None:
    """Load checkpoint `ck` into `t`: trainable weights (keys and shapes checked), optimizer, every RNG,
    the step, the best validation result and the non-finite skip count."""
    state, saved_rng = read_checkpoint(ck, t.raw, t.inner_opt)
    rng = rng_of_rank(saved_rng, t.acc.process_index)
    if rng is None:  # more processes than wrote the checkpoint: this rank's draws cannot be exact
        print(f"[kava] {ck}: no RNG state for process {t.acc.process_index}; using process 0's (the resumed "
              "run's dropout / random eviction on this process will differ from an uninterrupted run)")
        rng = rng_of_rank(saved_rng, 0)
    restore_rng(rng)
    gen = t.acc.unwrap_model(t.objective).generator
    if not restore_generator(gen, rng.get("eviction")):
        print(f"[kava] {ck}: its eviction RNG state is another device type's than {gen.device.type}'s; "
              f"keeping the generator seeded with run.seed (random eviction will differ from an uninterrupted run)")
    t.step, t.best = state["step"], state["best"]
    t.nonfinite_skipped = state.get("nonfinite_skipped", 0)


def save_run_files(cfg: Config, run_dir: Path, data: Data, plan: Plan, world: int, graphs: bool = False) -> None:
    """A new run's config.yaml, meta.json and skips.json (main process); `graphs`: whether CUDA graphs run
    the micro-steps (what `optim.cuda_graphs: auto` decided)."""
    rd = RunDir(run_dir)
    save_config(cfg, rd.config)
    meta = {"method": cfg.method, "preset": cfg.preset, "train_data": train_data_label(cfg),
            "data": data.desc, "seed": cfg.run.seed, "model": cfg.model.name_or_path or "from_scratch",
            "init_from": cfg.model.init_from, "world_size": world, "git": git_revision(), "versions": versions(),
            "train_examples": len(data.items), "train_examples_without_cot": data.no_cot, "plan": plan.__dict__,
            "cuda_graphs": graphs, "valid_examples": len(data.valid_recs),
            "valid_skips": {"total": data.valid_skips.total, "by_reason": dict(data.valid_skips.counts)}}
    rd.meta.write_text(json.dumps(meta, indent=2))
    # the start summary named it; the training skips at the top level, the validation ones under "validation"
    rd.skips.write_text(json.dumps({**data.skips.as_dict(), "validation": data.valid_skips.as_dict()}, indent=2))


@dataclass
class StepResult:
    sums: dict[str, torch.Tensor]  # every logged term, averaged over this rank's micro-batches
    grad_norm: torch.Tensor | float  # before clipping
    tokens: int  # tokens this rank processed
    bad: list[str] | None = None  # non-finite terms ("grad_norm": only the gradient); None: the step was applied


@dataclass
class PreparedStep:
    """The host half of an optimizer step: this rank's micro-batches, built on the CPU (pinned when training on
    a GPU, so their copies do not wait for the GPU), and the step's CE denominators."""
    micro: list  # kava.objective.Batch per micro-batch of this rank
    ce_den: dict[str, float]


def prepare_step(t: Trainer, items: list[Tokenized], batch: tuple[int, ...],
                 latent_counts: list[int] | None = None) -> PreparedStep:
    """Build optimizer step `batch`'s micro-batches (example indices into `items`; `latent_counts`: per example
    of `items`, its thoughts, from Coconut's curriculum). No device work: the training loop builds step s+1's
    while the GPU runs step s (`run_step(before_sync=...)`).

    Splits the batch into `optim.micro_batch`-sized micro-batches (of similar lengths with
    `optim.group_by_length`) and takes this rank's share. The CE terms are sums over the whole step's label
    count (`ce_denominators`), so the gradient does not depend on the split."""
    cfg, acc, raw, world = t.cfg, t.acc, t.raw, t.acc.num_processes
    mb = cfg.optim.micro_batch
    if cfg.optim.group_by_length:  # similar lengths share a micro-batch: less padding (stable, so deterministic)
        batch = tuple(sorted(batch, key=lambda j: length_key(items[j])))
    all_micro = [batch[i:i + mb] for i in range(0, len(batch), mb)]
    micro = all_micro[acc.process_index::world]
    ce_den = ce_denominators([items[j] for j in batch], cfg, len(all_micro))
    built = []
    for idx in micro:
        b = make_batch([items[j] for j in idx], raw.ids, cfg,
                       buckets=cfg.optim.graph_buckets if t.graphs is not None else None,
                       latent_counts=None if latent_counts is None else [latent_counts[j] for j in idx])
        if acc.device.type == "cuda":  # page-locked: the copy to the GPU is then asynchronous
            b.teacher = None if b.teacher is None else b.teacher.pin()
            b.student = None if b.student is None else b.student.pin()
        built.append(b)
    return PreparedStep(built, ce_den)


GRAPH_LOOKAHEAD = 32  # optimizer steps whose micro-batches `precapture_largest` looks at


def precapture_largest(t: Trainer, steps: list[PreparedStep]) -> None:
    """Capture the largest micro-batch shape of `steps` before training (`GraphedStep.precapture`): the graphs
    share one pool, and the smaller shapes captured later fit in the memory the largest one freed. The same
    training follows (a capture leaves the gradients and the RNG as they were)."""
    micro = [(b, p.ce_den) for p in steps for b in p.micro]
    if not micro:
        return
    b, den = max(micro, key=lambda m: batch_volume(m[0]))
    dev = Batch(None if b.teacher is None else b.teacher.to(t.acc.device),
                None if b.student is None else b.student.to(t.acc.device), b.num_tokens,
                {k: torch.tensor(v, dtype=torch.float32).to(t.acc.device) for k, v in den.items()})
    t.graphs.precapture([dev])


def train_step(t: Trainer, items: list[Tokenized], batch: tuple[int, ...], *, accum: int, step: int,
               logger: MetricLogger, latent_counts: list[int] | None = None) -> StepResult:
    """One optimizer step on the global batch `batch` (example indices; `step` is 0-based): `prepare_step`,
    then `run_step`."""
    return run_step(t, prepare_step(t, items, batch, latent_counts), accum=accum, step=step, logger=logger)


def micro_steps(t: Trainer, p: PreparedStep, ce_den, *, accum: int, step: int,
                logger: MetricLogger) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of each micro-batch of `p` (graph replays where captured, else eager), the
    gradients accumulated into `.grad`: (the step's mean log terms, its token count)."""
    cfg, acc, raw = t.cfg, t.acc, t.raw
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for i, b in enumerate(p.micro):
        b.ce_den = ce_den
        tokens += b.num_tokens
        log = t.graphs(b) if t.graphs is not None else None  # None: not graphed, run eagerly
        if log is None:
            sync = acc.no_sync(t.objective) if i < len(p.micro) - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                total, log = t.objective(b)
                acc.backward(total / accum)
        for k, v in log.items():
            sums[k] = sums.get(k, 0.0) + v.float() / len(p.micro)
        if t.main and grad_share_due(cfg, step + 1) and i == grad_share_micro(cfg, step + 1, len(p.micro)):
            # per-term gradient norms (kava.training.gradshare), rotating over the step's (length-ordered) micro-batches
            logger.log({"split": "train", **measure(raw, b, cfg, acc.device, acc.autocast())}, step + 1)
    return sums, tokens


def run_step(t: Trainer, p: PreparedStep, *, accum: int, step: int, logger: MetricLogger,
             before_sync=None) -> StepResult:
    """The device half of an optimizer step (`step` is 0-based) on the micro-batches `p` holds.

    Back-propagates each micro-batch's `total / accum` (DDP syncs only on the last), then clips and steps —
    unless the loss or the gradient is non-finite on any rank: then the gradients are dropped, no weight
    changes, and `bad` names the terms (`run.nan_policy` is the caller's). `before_sync()`, if given, runs once
    the step's device work is queued and before the one host sync that waits for it: host work placed there
    overlaps the GPU.
    """
    cfg, acc, raw, world = t.cfg, t.acc, t.raw, t.acc.num_processes
    ce_den = p.ce_den
    if t.graphs is not None:  # a graph reads its denominators from device memory at every replay
        ce_den = {k: torch.tensor(v, dtype=torch.float32).to(acc.device) for k, v in ce_den.items()}
    for b in p.micro:
        if b.teacher is not None:
            b.teacher = b.teacher.to(acc.device)
        if b.student is not None:
            b.student = b.student.to(acc.device)
    try:
        sums, tokens = micro_steps(t, p, ce_den, accum=accum, step=step, logger=logger)
    except torch.OutOfMemoryError as err:
        if t.graphs is None or t.graphs.disabled is not None:
            raise
        # an eager micro-batch (a shape beyond optim.max_graphs) did not fit beside the graphs' memory pool: give
        # the pool back and run the whole step again eagerly (its gradients so far are dropped; dropout draws
        # differ from the first attempt's)
        t.opt.zero_grad(set_to_none=False)
        t.graphs.turn_off(err, f"out of memory in an eager micro-batch at step {step + 1}")
        sums, tokens = micro_steps(t, p, p.ce_den, accum=accum, step=step, logger=logger)
    gnorm = acc.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else \
        torch.sqrt(sum((p.grad.float() ** 2).sum() for p in raw.parameters() if p.grad is not None))
    # a finite loss can still have an inf/NaN gradient (overflow in backward): stepping on it would make
    # every weight NaN, and the next step's "last good state" would be that NaN state
    keys = sorted(k for k in sums if k.startswith("loss/"))  # the same on every rank (same method)
    dev = sums["loss/total"].device
    flags = torch.stack([torch.isfinite(sums[k]) for k in keys] + [torch.isfinite(torch.as_tensor(gnorm).to(dev))])
    if world > 1:  # every rank takes the same branch below and names the same terms, whichever rank failed
        flags = acc.reduce(flags.float().to(acc.device), reduction="sum") == world
    if before_sync is not None:
        before_sync()
    flags = flags.tolist()  # the one host sync per optimizer step
    if not all(flags):
        ok = dict(zip(keys, flags))
        bad = [k for k in keys if k != "loss/total" and not ok[k]]
        if not bad and ok["loss/total"]:
            bad = ["grad_norm"]
        t.opt.zero_grad(set_to_none=t.graphs is None)  # a graph keeps accumulating into the same tensors
        return StepResult(sums, gnorm, tokens, bad)
    t.opt.step()
    t.opt.zero_grad(set_to_none=t.graphs is None)
    return StepResult(sums, gnorm, tokens)


def nonfinite_error(bad: list[str], step: int, run_dir: Path) -> NonFiniteLoss:
    """What `run.nan_policy: stop` raises at 0-based step `step`, after saving the state before it."""
    what = "gradient" if bad == ["grad_norm"] else "loss"
    return NonFiniteLoss(f"non-finite {what} at optimizer step {step + 1} in term(s) {bad or ['total']}; "
                         f"last good state saved in {RunDir(run_dir).step(step)}; "
                         "set run.nan_policy=skip to skip such batches")


def train_metrics(t: Trainer, r: StepResult, *, epoch: float, lr: float, tokens_per_s: float,
                  steps_per_s: float) -> dict:
    """A train line of `metrics.jsonl`: every term averaged over all ranks' micro-batches (as one process
    would see it), and the peak GPU memory."""
    payload = {"split": "train", "epoch": epoch, "lr": lr, "grad_norm": float(r.grad_norm),
               "tokens_per_s": tokens_per_s, "steps_per_s": steps_per_s}
    keys = sorted(r.sums)
    vals = torch.stack([r.sums[k].to(t.acc.device) for k in keys])
    if t.acc.num_processes > 1:
        vals = t.acc.reduce(vals, reduction="mean")
    payload.update({k: float(v) for k, v in zip(keys, vals.tolist())})
    if torch.cuda.is_available():
        payload["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if t.graphs is not None:
        payload.update(t.graphs.stats())
    return payload


def check_keep_position(cfg: Config, items: list[Tokenized]) -> None:
    """`icot.keep_position` needs every training CoT to have one length (multiplication's do): evaluation
    places the generated tokens after the removed ones, and how many a test question's CoT would have lost is
    the schedule's removal capped at that length."""
    if not curriculum.keeps_positions(cfg):
        return
    lengths = sorted({len(it.cot) for it in items})
    if len(lengths) > 1:
        raise ConfigError(f"icot.keep_position: needs every training CoT to have one length (evaluation cannot know "
                          f"a test question's); these have {len(lengths)} lengths, {lengths[0]} to {lengths[-1]} "
                          "tokens; set icot.keep_position=false")


def eval_position_skip(schedule, step: int, longest_cot: int) -> int:
    """The positions cot-mode evaluation leaves empty after the question for a model trained to optimizer step
    `step` (0-based): under `icot.keep_position`, the CoT tokens iCoT removes there (no smoothing offset), at
    most the CoT's length (`check_keep_position`); else 0."""
    if not isinstance(schedule, curriculum.Icot) or not schedule.section.keep_position:
        return 0
    return schedule.progress(step, longest_cot)


def validate(t: Trainer, valid_recs: list[Record], position_skip: int = 0,
             tf_items: list[Tokenized] | None = None) -> dict[str, float]:
    """Greedy accuracy on the validation records (`val/accuracy`), each rank decoding its share, and for digit
    answers the share of digits in place (`val/digits`, `kava.scoring.digit_agreement`); leaves the model in
    train mode. position_skip: `eval_position_skip`. tf_items: for a method evaluated by writing its CoT (cot,
    icot), the validation records tokenized as it trains on them now (iCoT's removal applied: `valid_tf_items`):
    then also the teacher-forced accuracy of what is left of the gold CoT and of the answer (`val/tf_cot`,
    `val/tf_answer`, `kava.evaluate.teacher_forced_accuracy`), on the main process.
    Decoding that runs out of memory beside the training graphs' pool validates again, so that a full card costs
    graphs, not the run: first without the decoding's own graphs (this validation decodes eagerly), then, if that
    runs out of memory too, with the training graphs turned off (their pool given back, a line saying so)."""
    def run(cfg):
        return evaluate_records(t.raw, t.tokenizer, cfg, valid_recs, rank=t.acc.process_index,
                                world=t.acc.num_processes, position_skip=position_skip)[0]

    try:
        rows = run(t.cfg)
    except torch.OutOfMemoryError as err:
        if t.graphs is None or t.graphs.disabled is not None:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        eager = dataclasses.replace(t.cfg, run=dataclasses.replace(t.cfg.run, eval_cuda_graphs=False))
        if t.main:
            print_line(f"[kava] validation after step {t.step}: out of memory beside the training graphs "
                       f"({type(err).__name__}); decoding it again without graphs")
        try:
            rows = run(eager)
        except torch.OutOfMemoryError as err2:
            t.graphs.turn_off(err2, f"out of memory in the validation after step {t.step}")
            rows = run(eager)
    rows = gather_object(rows)
    out = {"val/accuracy": sum(r["correct"] for r in rows) / max(1, len(rows))}
    if tf_items and t.main:
        t.raw.eval()
        with torch.no_grad():
            tf = teacher_forced_accuracy(t.raw, tf_items)
        out.update({f"val/tf_{k}": v for k, v in tf.items()})
    if rows and all("digits" in r for r in rows):
        out["val/digits"] = sum(r["digits"] for r in rows) / len(rows)
        # each answer place's accuracy: which digits a curriculum keeps or loses as it goes (multiplication)
        out.update({f"val/place{k}": a for k, a in enumerate(place_accuracy([r["places"] for r in rows]))})
    t.raw.train()
    return out


def valid_tf_items(items: list[Tokenized] | None, schedule, step: int, longest_cot: int) -> list[Tokenized] | None:
    """The tokenized validation records as optimizer step `step` (0-based) trains on them: iCoT's scheduled
    removal (no smoothing offset) applied to their CoT; `validate`'s tf_items. None stays None."""
    if items is None or schedule is None:
        return items
    return schedule.remove(items, [schedule.progress(step, longest_cot)] * len(items))


def is_better(schedule, best: dict, accuracy: float, step: int, longest_cot: int | None = None,
              digits: float | None = None) -> bool:
    """Whether a validation `accuracy` after optimizer step `step` (0-based) replaces `best`: a higher accuracy,
    or, under a curriculum (`schedule`, `kava.curriculum.for_config`; None without one), a further point of it
    (its `progress`, iCoT's capped at `longest_cot`) at any accuracy: the official iCoT loop forgets its best
    whenever more CoT is removed. At equal accuracy, more `digits` in place (digit answers) wins: a latent
    student at 0% exact match would otherwise keep its first validation whatever it learnt later."""
    if schedule is not None:
        now, then = schedule.progress(step, longest_cot), best.get("curriculum", 0)
        if now != then:
            return now > then
    if accuracy == best["val/accuracy"] and digits is not None and "val/digits" in best:
        return digits > best["val/digits"]
    return accuracy > best["val/accuracy"]


def save_checkpoint(t: Trainer, run_dir: Path, rng: dict[str, torch.Tensor] | None = None) -> None:
    """`checkpoints/step_<t.step>` (`kava.checkpoint.state.write_checkpoint`, by the main process; every rank
    calls it, for the RNG states). rng: this rank's RNG state to store (default: now; a NaN stop passes the
    state from before the bad step)."""
    rng = gather_rng(rng if rng is not None else t.rng_now(), t.acc.num_processes)
    if t.main:
        write_checkpoint(run_dir, t.step, t.raw, t.inner_opt, rng, t.counters())


def save_best(t: Trainer, run_dir: Path) -> None:
    """`best/`: the loadable model of `t.best` (the caller updates it, on the main process)."""
    meta = {"step": t.best["step"], "val/accuracy": t.best["val/accuracy"]}
    if curriculum.keeps_positions(t.cfg):  # where evaluation places the generated tokens: the removal at that step
        meta["position_skip"] = t.best.get("curriculum", 0)
    atomic_dir_write(RunDir(run_dir).best, lambda d: save_model(t.raw, t.tokenizer, d, meta=meta, cfg=t.cfg))


def save_final(t: Trainer, run_dir: Path, total_steps: int, skips: SkipLog, position_skip: int = 0) -> None:
    """`final/` (the loadable model) and `DONE` (main process). position_skip: `eval_position_skip` at the last
    step (recorded when nonzero)."""
    rd = RunDir(run_dir)
    meta = {"step": total_steps, "best": t.best, **({"position_skip": position_skip} if position_skip else {})}
    atomic_dir_write(rd.final, lambda d: save_model(t.raw, t.tokenizer, d, meta=meta, cfg=t.cfg))
    rd.done.write_text(json.dumps({"steps": total_steps, "best": t.best, "nonfinite_skipped": t.nonfinite_skipped,
                                   "skipped_records": skips.total}))


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: Config, *, resume: str | Path | None = None, progress: bool = True, stop_after: int | None = None,
          data_root: str | Path | None = None) -> Path:
    """Train `cfg` (or resume RUN_DIR) and return the run directory.

    stop_after: stop (without finishing) after this many optimizer steps in total — for tests and sweeps.
    """
    acc = setup_accelerator(cfg)
    main, world = acc.is_main_process, acc.num_processes
    fresh = resume is None and not (Path(cfg.run.output_dir) / run_name(cfg)).exists()
    run_dir, resume_ck = setup_run_dir(cfg, resume, main)
    with RunLock(run_dir, enabled=main), StopRequest() as stop:  # a second `kava train` here fails at once
        try:
            data = setup_data(cfg, run_dir, acc, data_root=data_root, resume_ck=resume_ck)
            check_keep_position(cfg, data.items)
            plan = make_plan(cfg, len(data.items), world)
            if main:
                print_start_summary(cfg, plan, run_dir, data, world, resume_ck)
            t = setup_model_and_optimizer(cfg, data.tokenizer, acc)
            logger = MetricLogger(run_dir, cfg.run.log + ["jsonl"], main, cfg)
        except BaseException:  # a run that fails at set-up leaves no run directory it created
            if fresh and main and not RunDir(run_dir).started():
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if resume_ck is not None:
            resume_state(t, resume_ck)
            logger.truncate_after(t.step)  # metrics then equal an uninterrupted run's
        elif main:
            if resume:  # starting over: drop what the stopped attempt logged
                logger.truncate_after(0)
            save_run_files(cfg, run_dir, data, plan, world, graphs=t.graphs is not None)

        eval_every = cfg.run.eval_every or plan.steps_per_epoch
        longest_cot = max((len(it.cot) for it in data.items), default=0)  # iCoT's progress stops growing there
        # the validation records with their CoT, once, for the teacher-forced accuracy of CoT-writing methods
        valid_items = None
        if cfg.spec.eval_mode == "cot" and main:
            fmt = Formatter.from_config(cfg, data.tokenizer, limits=False)
            valid_items = [it for i, r in enumerate(data.valid_recs) if (it := fmt.tokenize(r, i)) is not None]
        save_every = cfg.run.save_every or eval_every
        end_step = plan.total_steps if stop_after is None else min(plan.total_steps, stop_after)
        bar = tqdm(total=plan.total_steps, initial=t.step, desc=f"train {cfg.method}", disable=not main or not progress
                   or None, dynamic_ncols=True)
        ticker = ProgressLine(plan.total_steps, t.step, enabled=main and bar.disable)  # lines when no bar shows
        t.raw.train()
        t_last, tokens, steps = time.perf_counter(), 0, 0  # throughput since the last train line
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stop.arm()  # from here a signal stops at the next step boundary, with a checkpoint

        schedule = curriculum.for_config(cfg, plan.steps_per_epoch)  # iCoT's or Coconut's; None without one

        def examples(s: int) -> curriculum.StepExamples:
            """Optimizer step s's examples, as its curriculum rewrites them."""
            items = [data.items[j] for j in batch_indices(cfg, plan, len(data.items), s)]
            return curriculum.StepExamples(items, None, {}) if schedule is None else schedule.apply(items, s)

        def host_half(s: int) -> tuple[curriculum.StepExamples, PreparedStep]:
            """Step s's examples and micro-batches: host work only, a pure function of s."""
            ex = examples(s)
            return ex, prepare_step(t, ex.items, tuple(range(len(ex.items))), ex.latent_counts)

        if t.graphs is not None:  # the largest shape of the first steps first: the others then fit in its memory
            precapture_largest(t, [host_half(s)[1] for s in range(t.step, min(end_step, t.step + GRAPH_LOOKAHEAD))])
        ahead: dict[int, tuple[curriculum.StepExamples, PreparedStep]] = {}  # step s+1's, built during step s
        for step in range(t.step, end_step):
            step_rng = t.rng_now() if cfg.run.nan_policy == "stop" else None  # the last good state, if this step fails
            lr = lr_at(step, plan.total_steps, cfg.optim.lr, plan.warmup_steps, cfg.optim.schedule)
            for g in t.opt.param_groups:
                g["lr"] = lr
            # the method's curriculum (iCoT, Coconut) rewrites this step's examples; a pure function of the step
            ex, prepared = ahead.pop(step) if step in ahead else host_half(step)
            if schedule is not None and schedule.reset_due(step, previous=lambda: examples(step - 1)):
                t.inner_opt.state.clear()  # a fresh AdamW state at a new stage (the official recipes)
            nxt = step + 1
            r = run_step(t, prepared, accum=plan.accum, step=step, logger=logger,
                         before_sync=(lambda: ahead.update({nxt: host_half(nxt)})) if nxt < end_step else None)
            r.sums.update({k: torch.tensor(v) for k, v in ex.stats.items()})
            tokens, steps = tokens + r.tokens, steps + 1
            if r.bad is not None:  # non-finite: nothing was updated
                if cfg.run.nan_policy == "stop":
                    save_checkpoint(t, run_dir, rng=step_rng)  # t.step == step: the state before this step
                    raise nonfinite_error(r.bad, step, run_dir)
                t.step, t.nonfinite_skipped = step + 1, t.nonfinite_skipped + 1
                logger.log({"split": "train", "nonfinite_skipped": t.nonfinite_skipped, "bad_terms": r.bad}, t.step)
                bar.update(1)
                continue
            t.step = step + 1
            bar.update(1)
            if t.step % cfg.run.log_every == 0 or t.step == plan.total_steps:
                now = time.perf_counter()
                payload = train_metrics(t, r, epoch=t.step / plan.steps_per_epoch, lr=lr,
                                        tokens_per_s=tokens * world / max(now - t_last, 1e-9),
                                        steps_per_s=steps / max(now - t_last, 1e-9))
                logger.log(payload, t.step)
                bar.set_postfix(loss=f"{payload['loss/total']:.3f}")
                ticker.update(t.step, payload["loss/total"])
                t_last, tokens, steps = now, 0, 0
            if t.step % eval_every == 0 or t.step == plan.total_steps:
                val = validate(t, data.valid_recs, eval_position_skip(schedule, t.step - 1, longest_cot),
                               valid_tf_items(valid_items, schedule, t.step - 1, longest_cot))
                v = val["val/accuracy"]
                logger.log({"split": "val", **val}, t.step)
                if main and is_better(schedule, t.best, v, t.step - 1, longest_cot, val.get("val/digits")):
                    t.best = {**val, "step": t.step}
                    if schedule is not None:
                        t.best["curriculum"] = schedule.progress(t.step - 1, longest_cot)
                    save_best(t, run_dir)
                if main:
                    print_line(validation_line(t.step, v, t.best, val.get("val/digits")))
            saved = t.step % save_every == 0 or t.step == plan.total_steps
            if saved:
                save_checkpoint(t, run_dir)
            if (signum := stop.should_stop(acc)) is not None:  # Ctrl-C / SIGTERM: checkpoint, then stop
                if not saved:
                    save_checkpoint(t, run_dir)
                bar.close()
                logger.close()
                raise TrainingInterrupted(signum, run_dir, t.step, plan.total_steps)
        bar.close()
        if end_step == plan.total_steps and main:
            save_final(t, run_dir, plan.total_steps, data.skips,
                       eval_position_skip(schedule, plan.total_steps - 1, longest_cot))
        if main and data.skips.total:  # again at the end: the first report has long scrolled away
            print(f"[kava] training data: {data.skips.summary()}; where: {RunDir(run_dir).skips}")
        logger.close()
        acc.wait_for_everyone()
        return run_dir


# ------------------------------------------------------------------------------------------------ before a run
def plan_only(cfg: Config) -> list[str]:
    """The resolved config and the training plan, without loading a model: the lines `kava train --dry-run`
    prints. The data is read (and tokenized, unless the run would train its own tokenizer); nothing is written
    but the data cache under `run.output_dir/_data`."""
    skips, valid_skips = SkipLog(strict=cfg.data.strict), SkipLog()
    train_recs, valid_recs, desc = load_train_valid(cfg, Path(cfg.run.output_dir) / "_data", skips, valid_skips)
    n = len(train_recs)
    how = "records (not tokenized: the tokenizer is built at the start of training)"
    if not own_tokenizer(cfg):
        n = len(Formatter.from_config(cfg, load_tokenizer(cfg)).tokenize_all(train_recs, skips))
        how = "examples after the length limits"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = make_plan(cfg, n, world)
    return [cfg.to_yaml().rstrip(), "", "plan:"] + plan_lines(
        cfg, plan, run_dir=Path(cfg.run.output_dir) / run_name(cfg), world=world, data_desc=desc,
        train_desc=f"{n} {how}; {skips.summary()}", n_valid=len(valid_recs), valid_skips=valid_skips)


def resume_plan(run_dir: str | Path, cfg: Config, overrides: list[str]) -> Config | None:
    """What `kava train --resume RUN [--set optim.max_steps=N]` continues: the run's config `cfg` (None: a
    finished run, nothing to do, said so). `optim.max_steps` is the one key a resume may change: N beyond the
    run's end extends it (`RunDir.extend`: config.yaml rewritten, DONE removed, the LR schedule's end moved to N,
    said so; a run in use is refused before any of that); any other key is refused."""
    rd = RunDir(run_dir)
    run_dir = rd.path
    new = load_config(str(rd.config), overrides, resolve_paths=False) if overrides else cfg
    a, b = cfg.to_dict(), new.to_dict()
    a["optim"]["max_steps"] = b["optim"]["max_steps"]
    if a != b:
        keys = ", ".join(parse_override(o)[0] for o in overrides)
        raise ConfigError(f"--resume takes the run's own config.yaml; --set may change only optim.max_steps "
                          f"(to extend the run), got {keys}")
    done = rd.read_done()
    if not overrides or new.optim.max_steps == cfg.optim.max_steps:
        if done is not None:
            print(f"kava train: {run_dir} is finished ({done['steps']} steps; DONE); nothing to do. To train it "
                  f"further: kava train --resume {run_dir} --set optim.max_steps=N")
            return None
        return cfg
    ck = rd.latest_checkpoint()
    at = read_state(ck)["step"] if ck is not None else 0
    before = done["steps"] if done else (rd.read_meta().get("plan") or {}).get("total_steps", cfg.optim.max_steps)
    if new.optim.max_steps <= at:
        raise ConfigError(f"optim.max_steps={new.optim.max_steps}: {run_dir} is already at step {at}; give more steps")
    # the main process alone writes the run's files (no Accelerator yet: RANK is what a launcher sets)
    rd.extend(new, before=before, at=at, main=int(os.environ.get("RANK", "0")) == 0)
    print(f"[kava] extending {run_dir}: optim.max_steps {before} -> {new.optim.max_steps} from step {at}; the LR "
          f"schedule ({new.optim.schedule}, warmup {new.optim.warmup_ratio:g} of the steps) now ends at step "
          f"{new.optim.max_steps}, so the learning rate from step {at} on follows the new schedule", flush=True)
    return new


def resume_config(run_dir: str | Path) -> Config:
    p = RunDir(run_dir).config
    if not p.exists():
        raise FileNotFoundError(f"{run_dir}: no {p.name} (not a kava run directory)")
    return load_config(str(p), resolve_paths=False)


# what a fork may not change: the model and its tokenizer, the data and the batch (which fix the steps per epoch,
# so the curriculum's schedule and the examples of each step), and the method
FORK_FIXED = ("method", "model", "lora", "data", "optim.effective_batch")


def fork_run(src: str | Path, dst: str | Path, overrides: list[str], step: int | None = None) -> Path:
    """A new run directory `dst` that continues run `src` from its checkpoint `step` (default: the latest) under
    changed hyperparameters `overrides` (e.g. optim.lr, icot.reset_optimizer): `kava train --resume dst` then
    trains it. The branch point, the weights, the optimizer state and every RNG are the source's, so a fork
    without changes ends bit for bit where the source run would. Copied: config.yaml (with the overrides and
    dst's run.name / run.output_dir), meta.json (with "fork": source, step, changes), skips.json, the tokenizer
    the run trained, metrics.jsonl up to `step`, and that checkpoint; not best/, final/ or eval/ (the fork's
    own come from its own validations). Keys under FORK_FIXED are refused: they change what a step means."""
    s, d = RunDir(src), RunDir(dst)
    if d.path.exists():
        raise FileExistsError(f"{d.path}: exists; a fork needs a new run directory")
    if step is None:
        ck = s.latest_checkpoint()
        if ck is None:
            raise FileNotFoundError(f"{s.path}: no training checkpoint to fork from")
    else:
        ck = s.step(step)
        if not (ck / STATE_FILE).exists():
            have = ", ".join(str(step_of(p)) for p in s.step_dirs()) or "none"
            raise FileNotFoundError(f"{s.path}: no complete checkpoint of step {step} (have: {have})")
    at = step_of(ck)
    old = resume_config(s.path)
    new = load_config(str(s.config), [*overrides, f"run.name={d.path.name}", f"run.output_dir={d.path.parent}"],
                      resolve_paths=False)
    a, b = old.to_dict(), new.to_dict()
    for key in FORK_FIXED:
        sec, _, leaf = key.partition(".")
        pick = lambda d: d[sec].get(leaf) if leaf else d[sec]  # noqa: E731
        if pick(a) != pick(b):
            raise ConfigError(f"{key}: a fork keeps the source run's {key} (it fixes what a step trains); "
                              f"start a new run to change it")
    if new.optim.max_steps is not None and new.optim.max_steps <= at:  # (None: the epochs decide)
        raise ConfigError(f"optim.max_steps={new.optim.max_steps}: the fork starts at step {at}; give more steps")
    d.path.mkdir(parents=True)
    save_config(new, d.config)
    meta = s.read_meta()
    meta["fork"] = {"from": str(s.path.resolve()), "step": at, "changes": list(overrides)}
    d.meta.write_text(json.dumps(meta, indent=2))
    if s.skips.exists():
        shutil.copyfile(s.skips, d.skips)
    if s.tokenizer_src.exists():
        shutil.copytree(s.tokenizer_src, d.tokenizer_src)
    if s.metrics.exists():
        lines = [ln for ln in s.metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= at]
        d.metrics.write_text("".join(ln + "\n" for ln in lines))
    shutil.copytree(ck, d.step(at))
    return d.path
