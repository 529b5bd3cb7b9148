"""Curricula: schedules that rewrite each optimizer step's examples as training goes on.

    icot     stepwise internalization (Deng et al. 2024, arXiv 2405.14838): the first r(step) CoT tokens are
             removed, r growing by `icot.tokens_per_epoch` per epoch, plus a per-example offset o with
             P(o) ∝ exp(-λ·o) ("removal smoothing"); past `icot.remove_all_beyond` the whole CoT goes. CE on
             what remains; evaluated without CoT.
    coconut  continuous thoughts (Hao et al. 2024, arXiv 2412.06769): at stage s the first s CoT steps are
             replaced by s·c thoughts (each the last hidden state fed back as the next input embedding,
             `LatentReasoner.student_forward(mode="sequential")` with the identity projection); past the last
             stage every step is. CE on the remaining steps and the answer.

Everything here is a pure function of (config, step, steps per epoch, the example): a resumed run sees the
same examples and the same optimizer resets as an uninterrupted one, with no state in the checkpoint. The
random draws (iCoT's offsets, Coconut's stage mixing) come from a generator seeded by (run.seed, step), one
draw per example in the step's order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from kava.data.format import Tokenized

ALL = 10**9  # iCoT's schedule once it removes the whole CoT
_OFFSETS = 100  # iCoT's smoothing offsets 0..99 (the official truncation; the tail mass sits on the last)


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 7919)


# ------------------------------------------------------------------------------------------------ iCoT
def icot_steps_per_token(steps_per_epoch: int, ic) -> int:
    """Optimizer steps between two removals: round(steps_per_epoch / tokens_per_epoch), Python's rounding, as
    the official loop computes `steps_per_removed_token` (0: one more token every step)."""
    return int(round(steps_per_epoch / ic.tokens_per_epoch))


def icot_scheduled(step: int, steps_per_epoch: int, ic) -> int:
    """CoT tokens scheduled for removal at optimizer step `step` (0-based), as the official loop counts them: one
    more token every `icot_steps_per_token` steps (step // that; step + 1 when it is 0), or `ALL` once that
    reaches `icot.remove_all_beyond`. (floor(step · tokens_per_epoch / steps_per_epoch) differs from it by up
    to a token per epoch wherever steps_per_epoch is not a multiple of the rate.)"""
    every = icot_steps_per_token(steps_per_epoch, ic)
    n = step + 1 if every == 0 else step // every
    if ic.remove_all_beyond is not None and n >= ic.remove_all_beyond:
        return ALL
    return n


def icot_offset_probs(lam: float | None) -> torch.Tensor:
    """[100] P(o) = (1 - e^-λ) e^(-λ·o) for o < 99, the rest of the mass on o = 99; λ None or inf: always 0
    (inf is the official code's "no smoothing"; the formula would give inf·0 = NaN at o = 0)."""
    p = torch.zeros(_OFFSETS, dtype=torch.float64)
    if lam is None or math.isinf(lam):
        p[0] = 1.0
        return p
    o = torch.arange(_OFFSETS, dtype=torch.float64)
    p = (1 - math.exp(-lam)) * torch.exp(-lam * o)
    p[-1] = 1.0 - p[:-1].sum()
    return p


def icot_removed(n: int, scheduled: int, lam: float | None, g: torch.Generator) -> list[int]:
    """Tokens removed from the front of each of `n` examples' CoT: the schedule plus each one's offset."""
    if scheduled >= ALL:
        return [ALL] * n
    offs = torch.multinomial(icot_offset_probs(lam), n, replacement=True, generator=g) if n else torch.zeros(0)
    return [scheduled + int(o) for o in offs]


# ------------------------------------------------------------------------------------------------ Coconut
def coconut_steps_per_stage(steps_per_epoch: int, cc) -> int:
    return max(1, round(steps_per_epoch * cc.epochs_per_stage))


def coconut_stage(step: int, steps_per_epoch: int, cc) -> int:
    """The curriculum stage of optimizer step `step`: step // (steps_per_epoch · epochs_per_stage)."""
    return step // coconut_steps_per_stage(steps_per_epoch, cc)


def coconut_layout(num_steps: int, stage: int, cc) -> tuple[int, int]:
    """(CoT steps replaced, thoughts) of an example with `num_steps` steps trained at `stage`: s steps and
    s·c thoughts up to `max_stages`; past it every step, with max_stages·c thoughts (`pad_latents_to_max`)
    or min(num_steps, max_stages)·c."""
    c = cc.thoughts_per_step
    if stage > cc.max_stages:
        return num_steps, (cc.max_stages if cc.pad_latents_to_max else min(num_steps, cc.max_stages)) * c
    return min(stage, num_steps), stage * c


def without_steps(item: Tokenized, skip: int) -> Tokenized:
    """`item` with its first `skip` CoT steps removed (`Tokenized.step_ends`; no ends: the CoT is one step)."""
    if skip <= 0:
        return item
    ends = item.step_ends or ((len(item.cot),) if item.cot else ())
    if skip >= len(ends):
        return dataclasses.replace(item, cot=[], step_ends=())
    cut = ends[skip - 1]
    return dataclasses.replace(item, cot=item.cot[cut:], step_ends=tuple(e - cut for e in ends[skip:]))


# ------------------------------------------------------------------------------------------------ both
@dataclasses.dataclass
class StepExamples:
    items: list[Tokenized]  # the step's examples as this step trains on them
    latent_counts: list[int] | None  # Coconut: thoughts per example; None otherwise
    stats: dict[str, float]  # what the train log records (`curriculum/*`)
    all_cot_removed: bool = False  # iCoT: no example of the step kept a CoT token


def apply(items: list[Tokenized], cfg, step: int, steps_per_epoch: int) -> StepExamples:
    """The examples of optimizer step `step` under the method's curriculum (unchanged without one)."""
    kind = cfg.spec.curriculum
    if kind is None:
        return StepExamples(items, None, {})
    g = _generator(cfg.run.seed, step)
    if kind == "icot":
        sched = icot_scheduled(step, steps_per_epoch, cfg.icot)
        cut = icot_removed(len(items), sched, cfg.icot.smoothing_lambda, g)
        out = [dataclasses.replace(it, cot=it.cot[min(k, len(it.cot)):], step_ends=()) for it, k in zip(items, cut)]
        return StepExamples(out, None, {"curriculum/removed": float(min(sched, ALL)) if sched < ALL else -1.0},
                            all_cot_removed=bool(items) and all(k >= len(it.cot) for it, k in zip(items, cut)))
    if kind == "coconut":
        cc = cfg.coconut
        stage = coconut_stage(step, steps_per_epoch, cc)
        u = torch.rand(len(items), generator=g, dtype=torch.float64).tolist()
        pick = torch.rand(len(items), generator=g, dtype=torch.float64).tolist()
        out, counts = [], []
        for it, ui, pi in zip(items, u, pick):
            n = len(it.step_ends) if it.step_ends else (1 if it.cot else 0)
            s = min(int(pi * (n + 1)), n) if ui < cc.mix_prob else stage  # mixing: a random stage in 0..n
            skip, lat = coconut_layout(n, s, cc)
            out.append(without_steps(it, skip))
            counts.append(lat)
        # logged stage: max_stages + 1 for every stage past the last (all steps replaced)
        return StepExamples(out, counts, {"curriculum/stage": float(min(stage, cc.max_stages + 1))})
    raise ValueError(f"unknown curriculum {kind!r}")


def reset_due(cfg, step: int, steps_per_epoch: int, previous: Callable[[], StepExamples] | None = None) -> bool:
    """Whether the optimizer state is reset before optimizer step `step`: the curriculum moved on since the
    previous step (a new Coconut stage, a larger iCoT removal) and its `reset_optimizer` is on.

    previous: the examples of step - 1 (`apply`), asked only at an iCoT growth: as the official loop does, no
    reset follows a step whose examples had all lost their whole CoT (short CoTs would otherwise reset the
    optimizer at every growth step long after nothing is left to remove)."""
    kind = cfg.spec.curriculum
    if kind is None or step == 0:
        return False
    if kind == "icot":
        grew = icot_scheduled(step, steps_per_epoch, cfg.icot) != icot_scheduled(step - 1, steps_per_epoch, cfg.icot)
        return cfg.icot.reset_optimizer and grew and not (previous is not None and previous().all_cot_removed)
    cc = cfg.coconut
    if cc.reset_every == "epoch":  # the official run.py re-creates AdamW at every epoch start
        return cc.reset_optimizer and step % steps_per_epoch == 0
    last = cc.max_stages + 1  # every stage from here on has the same layout: no more resets
    return cc.reset_optimizer and (min(coconut_stage(step, steps_per_epoch, cc), last)
                                   != min(coconut_stage(step - 1, steps_per_epoch, cc), last))


def progress(cfg, step: int, steps_per_epoch: int, longest_cot: int | None = None) -> int:
    """How far the curriculum is at optimizer step `step`: iCoT's scheduled removal, capped at `longest_cot` (the
    longest training CoT, in tokens: from there on every example has lost its whole CoT, so the schedule's growth
    changes nothing), Coconut's stage (capped past the last); 0 without a curriculum. The best checkpoint is
    chosen among the validations of the furthest point reached (the official iCoT loop forgets its best accuracy
    whenever a batch still kept CoT tokens, and compares accuracies once none does): an early checkpoint that
    still writes its CoT is not the method's model."""
    kind = cfg.spec.curriculum
    if kind == "icot":
        n = icot_scheduled(step, steps_per_epoch, cfg.icot)
        return n if longest_cot is None else min(n, longest_cot)
    if kind == "coconut":
        return min(coconut_stage(step, steps_per_epoch, cfg.coconut), cfg.coconut.max_stages + 1)
    return 0


def describe(cfg, steps_per_epoch: int) -> str | None:
    """One line for the start summary: the schedule in optimizer steps (None without a curriculum)."""
    kind = cfg.spec.curriculum
    if kind == "coconut":
        cc = cfg.coconut
        return (f"coconut: {cc.max_stages} stages of {coconut_steps_per_stage(steps_per_epoch, cc)} steps, "
                f"{cc.thoughts_per_step} thoughts per CoT step, then every step replaced "
                f"({cc.max_stages * cc.thoughts_per_step} thoughts); optimizer reset "
                f"{'at each ' + cc.reset_every if cc.reset_optimizer else 'never'}; mix_prob {cc.mix_prob}")
    if kind == "icot":
        ic = cfg.icot
        every = "never" if ic.remove_all_beyond is None else f"from {ic.remove_all_beyond} tokens on"
        per = icot_steps_per_token(steps_per_epoch, ic)
        return (f"icot: {ic.tokens_per_epoch} CoT tokens removed per epoch ({steps_per_epoch} steps: one token every "
                f"{per} steps), smoothing "
                f"lambda {ic.smoothing_lambda}, whole CoT removed {every}; optimizer reset "
                f"{'at each growth' if ic.reset_optimizer else 'never'}")
    return None
