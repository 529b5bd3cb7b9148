"""Curricula: schedules that rewrite each optimizer step's examples as training goes on.

    icot     stepwise internalization (Deng et al. 2024, arXiv 2405.14838): the first r(step) CoT tokens are
             removed, r growing by `icot.tokens_per_epoch` per epoch, plus a per-example offset o with
             P(o) ∝ exp(-λ·o) ("removal smoothing"); past `icot.remove_all_beyond` the whole CoT goes. CE on
             what remains; evaluated by free generation from the question (whatever CoT is left is written).
    coconut  continuous thoughts (Hao et al. 2024, arXiv 2412.06769): at stage s the first s CoT steps are
             replaced by s·c thoughts (each the last hidden state fed back as the next input embedding,
             `LatentReasoner.student_forward(student_mode="sequential")` with the identity projection); past the last
             stage every step is. CE on the remaining steps and the answer.

`for_config` gives the method's schedule (`Icot`, `Coconut`: `apply`, `reset_due`, `progress`, `describe`;
`derive` and `check` for the config). Everything here is a pure function of (config, step, steps per epoch, the
example): a resumed run sees the
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


# ------------------------------------------------------------------------------------------------ the schedules
@dataclasses.dataclass
class StepExamples:
    items: list[Tokenized]  # the step's examples as this step trains on them
    latent_counts: list[int] | None  # Coconut: thoughts per example; None otherwise
    stats: dict[str, float]  # what the train log records (`curriculum/*`)
    all_cot_removed: bool = False  # iCoT: no example of the step kept a CoT token


class Schedule:
    """What a curriculum holds: its config section (named as the curriculum), the run's seed and the steps per
    epoch. `derive` and `check` (what it needs of the rest of the config) default to nothing."""

    name = ""

    def __init__(self, section, seed: int, steps_per_epoch: int):
        self.section, self.seed, self.spe = section, seed, steps_per_epoch

    @staticmethod
    def derive(cfg, explicit: set[str]) -> list[str]:
        return []

    @staticmethod
    def check(cfg) -> list[str]:
        return []


class Icot(Schedule):
    """iCoT's schedule over optimizer steps (`icot.*`, `run.seed`). Every method is a pure function of the step."""

    name = "icot"

    def scheduled(self, step: int) -> int:
        return icot_scheduled(step, self.spe, self.section)

    def apply(self, items: list[Tokenized], step: int) -> StepExamples:
        """Step `step`'s examples with the scheduled tokens, plus each one's offset, cut from the CoT's front
        (with `icot.keep_position`, what is left keeps its positions: `Tokenized.pos_skip`)."""
        sched = self.scheduled(step)
        cut = icot_removed(len(items), sched, self.section.smoothing_lambda, _generator(self.seed, step))
        out = self.remove(items, cut)
        return StepExamples(out, None, {"curriculum/removed": float(min(sched, ALL)) if sched < ALL else -1.0},
                            all_cot_removed=bool(items) and all(k >= len(it.cot) for it, k in zip(items, cut)))

    def remove(self, items: list[Tokenized], counts: list[int]) -> list[Tokenized]:
        """`items` with the first `counts[i]` tokens of item i's CoT removed (at most all of it); with
        `icot.keep_position` what is left keeps its positions (`Tokenized.pos_skip`)."""
        keep = self.section.keep_position
        return [dataclasses.replace(it, cot=it.cot[min(k, len(it.cot)):], step_ends=(),
                                    pos_skip=min(k, len(it.cot)) if keep else 0) for it, k in zip(items, counts)]

    def reset_due(self, step: int, previous: Callable[[], StepExamples] | None = None) -> bool:
        """The scheduled removal grew at `step` (and `icot.reset_optimizer`), unless every example of the previous
        step (`previous()`, asked only then) had lost its whole CoT: the official loop skips that reset (short
        CoTs would otherwise reset the optimizer at every growth step long after nothing is left to remove)."""
        grew = step > 0 and self.scheduled(step) != self.scheduled(step - 1)
        return self.section.reset_optimizer and grew and not (previous is not None and previous().all_cot_removed)

    def progress(self, step: int, longest_cot: int | None = None) -> int:
        """The scheduled removal, capped at `longest_cot` (the longest training CoT: from there on every example
        has lost its whole CoT, and the schedule's growth changes nothing)."""
        n = self.scheduled(step)
        return n if longest_cot is None else min(n, longest_cot)

    def describe(self) -> str:
        ic = self.section
        every = "never" if ic.remove_all_beyond is None else f"from {ic.remove_all_beyond} tokens on"
        return (f"icot: {ic.tokens_per_epoch} CoT tokens removed per epoch ({self.spe} steps: one token every "
                f"{icot_steps_per_token(self.spe, ic)} steps), smoothing lambda {ic.smoothing_lambda}, whole CoT "
                f"removed {every}; optimizer reset {'at each growth' if ic.reset_optimizer else 'never'}")


class Coconut(Schedule):
    """Coconut's stages over optimizer steps (`coconut.*`, `run.seed`). Every method is a pure function of the
    step."""

    name = "coconut"

    def stage(self, step: int) -> int:
        return coconut_stage(step, self.spe, self.section)

    def apply(self, items: list[Tokenized], step: int) -> StepExamples:
        """Step `step`'s examples with their first s CoT steps replaced by s·c thoughts (s: the stage, or with
        `coconut.mix_prob` a random stage in 0..n per example)."""
        cc, stage = self.section, self.stage(step)
        g = _generator(self.seed, step)
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

    def reset_due(self, step: int, previous: Callable[[], StepExamples] | None = None) -> bool:
        """`coconut.reset_optimizer`: at every epoch start (`reset_every: epoch`, the official run.py) or at every
        stage change up to the last (`stage`)."""
        cc = self.section
        if step == 0 or not cc.reset_optimizer:
            return False
        if cc.reset_every == "epoch":
            return step % self.spe == 0
        return self.progress(step) != self.progress(step - 1)  # past the last stage the layout no longer changes

    def progress(self, step: int, longest_cot: int | None = None) -> int:
        """The stage, capped past the last (`max_stages + 1`: every step replaced)."""
        return min(self.stage(step), self.section.max_stages + 1)

    def describe(self) -> str:
        cc = self.section
        return (f"coconut: {cc.max_stages} stages of {coconut_steps_per_stage(self.spe, cc)} steps, "
                f"{cc.thoughts_per_step} thoughts per CoT step, then every step replaced "
                f"({cc.max_stages * cc.thoughts_per_step} thoughts); optimizer reset "
                f"{'at each ' + cc.reset_every if cc.reset_optimizer else 'never'}; mix_prob {cc.mix_prob}")

    @staticmethod
    def derive(cfg, explicit: set[str]) -> list[str]:
        """Set, in place, what Coconut fixes and `explicit` (the keys the user chose) does not name: M =
        max_stages x thoughts_per_step thoughts and the identity projection (a preset's latent.num_latents is the
        one of its own method). Returns the changes, for the start summary."""
        lat, cc, out = cfg.latent, cfg.coconut, []
        m = cc.max_stages * cc.thoughts_per_step  # < 1: `check` names the coconut key at fault
        if "latent.num_latents" not in explicit and lat.num_latents != m and m >= 1:
            out.append(f"latent.num_latents={m} (coconut.max_stages x coconut.thoughts_per_step; "
                       f"was {lat.num_latents})")
            lat.num_latents = m
        if "latent.projection" not in explicit and lat.projection != "identity":
            out.append(f"latent.projection=identity (coconut feeds hidden states back unchanged; was {lat.projection})")
            lat.projection = "identity"
        return out

    @staticmethod
    def check(cfg) -> list[str]:
        """What Coconut needs of the rest of the config (errors, each naming its key)."""
        lat, cc, bad = cfg.latent, cfg.coconut, []
        if lat.num_latents != cc.max_stages * cc.thoughts_per_step:
            bad.append(f"latent.num_latents: coconut answers after coconut.max_stages x coconut.thoughts_per_step = "
                       f"{cc.max_stages * cc.thoughts_per_step} thoughts, got latent.num_latents={lat.num_latents}; "
                       "set them to agree")
        if lat.projection != "identity":
            bad.append(f"latent.projection: coconut feeds each last hidden state back as the next input embedding "
                       f"(identity), got {lat.projection!r}; set latent.projection=identity")
        return bad


SCHEDULES = {c.name: c for c in (Icot, Coconut)}  # `MethodSpec.curriculum` names one of these


def schedule_class(cfg):
    """The class of the method's curriculum (None without one)."""
    return None if cfg.spec.curriculum is None else SCHEDULES[cfg.spec.curriculum]


def keeps_positions(cfg) -> bool:
    """The method's curriculum is iCoT with `icot.keep_position`: what is left of each CoT keeps its positions,
    so evaluation generates after the removed tokens (`Tokenized.pos_skip`, `kava.train:eval_position_skip`)."""
    return schedule_class(cfg) is Icot and cfg.icot.keep_position


def for_config(cfg, steps_per_epoch: int) -> Icot | Coconut | None:
    """The method's curriculum as a schedule over optimizer steps, or None."""
    cls = schedule_class(cfg)
    if cls is None:
        return None
    return cls(getattr(cfg, cls.name), cfg.run.seed, steps_per_epoch)  # its config section has its name
