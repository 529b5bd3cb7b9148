"""The training objective of every method of `kava.spec`: `loss_step` as named stages (SPEC §5).

    make_batch       examples -> the teacher (and student) batch; latent methods share one question block
    teacher_pass     the teacher on question · CoT · prompt · answer: CE states, CoDI states, CoT KV, importance
    kv_targets       the teacher's CoT KV -> `eviction.select_indices` -> `eviction.gather_slots`: the L_KV
                     targets. The diagnostics (`kava.diagnostics`) and `kava inspect` (`kava.tools.inspect_latents`)
                     call the same function through `teacher_kv_targets`, so all three see the same targets.
    student_terms    the student's latents and answer pass, and its terms: ce_student, codi, kv
    loss_step        all of them on one micro-batch -> (total, log)
    Objective        the torch module around the model that DDP wraps: forward(batch) = loss_step

Which stages run, and which terms enter the total, is the method's row of `kava.spec.SPECS`; methods differ
by those switches, never by forks of this code.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from kava import eviction, losses
from kava.data.format import (SpecialIds, TeacherBatch, Tokenized, block_widths, build_student_batch,
                              build_teacher_batch, label_totals)
from kava.model.capture import no_host_sync
from kava.model.reasoner import LatentReasoner, StudentOut, TeacherOut


@dataclass
class Batch:
    teacher: object | None  # None: a method without a teacher pass (`MethodSpec.teacher`: Coconut)
    student: object | None
    num_tokens: int  # real tokens across both sequences (for tokens/s)
    # Per-term CE denominators shared by all micro-batches of one optimizer step (see `ce_denominators`);
    # None: each micro-batch's CE is a plain mean over its own labels.
    ce_den: dict[str, float] | None = None


def length_key(item: Tokenized) -> int:
    """What `optim.group_by_length` sorts a step's examples by: question + CoT tokens (the teacher's width)."""
    return len(item.question) + len(item.cot)


def label_counts(items: list[Tokenized], cfg) -> dict[str, int]:
    """Labelled tokens of each CE term over `items` (the layout of `kava.data.format`)."""
    spec = cfg.spec
    # Coconut's answer block also holds (and learns) the CoT steps not yet replaced (`student_cot`)
    teacher, student = label_totals(items, with_cot=spec.teacher_cot, cot_in_answer=spec.student_cot)
    return {**({"ce_teacher": teacher} if spec.teacher else {}), **({"ce_student": student} if spec.latent else {})}


def ce_denominators(step_items: list[Tokenized], cfg, num_micro: int) -> dict[str, float]:
    """Gradient accumulation that does not change the gradient: every micro-batch divides its summed CE by
    (labelled tokens in the whole optimizer step) / (micro-batches in the step), so the mean over
    micro-batches (and ranks) is exactly the token mean over the full effective batch."""
    return {k: max(v, 1) / num_micro for k, v in label_counts(step_items, cfg).items()}


def make_batch(items: list[Tokenized], model_ids, cfg, buckets: float | None = None,
               latent_counts: list[int] | None = None) -> Batch:
    """The teacher (and student) batch of `items`. Latent methods lay both out in blocks with one question
    block, which `loss_step` runs once for both. buckets: static shapes for CUDA graphs: block widths from the
    geometric series of this growth (`kava.data.format.block_widths`); same losses as without.
    latent_counts: thoughts per example (Coconut's curriculum, `kava.curriculum.Coconut.apply`): the latent block is
    as wide as the largest; default `latent.num_latents` for every example."""
    spec = cfg.spec
    blocks = buckets is not None or spec.latent
    widths = block_widths(items, buckets, with_cot=spec.teacher_cot and spec.teacher, cot_in_answer=spec.student_cot,
                          label_growth=cfg.optim.graph_label_buckets) if blocks else None
    tb = build_teacher_batch(items, model_ids, with_cot=spec.teacher_cot, query_mode=cfg.eviction.importance_queries,
                             tail_window=cfg.eviction.cot_tail_window, codi_position=cfg.loss.codi_position,
                             widths=widths) if spec.teacher else None
    m = cfg.latent.num_latents if latent_counts is None else max(latent_counts, default=0)
    sb = build_student_batch(items, model_ids, m, codi_position=cfg.loss.codi_position, widths=widths,
                             latent_counts=latent_counts, with_cot=spec.student_cot) if spec.latent else None
    n = sum(int(part.mask.sum()) for part in (tb, sb) if part is not None)
    return Batch(tb, sb, n)


def _fp32(like: torch.Tensor):
    """Eviction and losses do their own fp32 math; autocast must not push their matmuls back to bf16."""
    return torch.autocast(like.device.type, enabled=False)


class _NoTimer:
    def __call__(self, name: str):
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ stages
def teacher_pass(model: LatentReasoner, tb: TeacherBatch, cfg, *, need_kv: bool, key_space: str | None = None,
                 share_question: bool = False) -> TeacherOut:
    """The teacher pass, with the CoT KV (in `key_space`, default `loss.kv_key_space`) and, when the eviction
    rule reads it (`eviction.NEEDS_IMPORTANCE`), the importance block under `eviction.importance_softmax`."""
    return model.teacher_forward(tb, need_kv=need_kv,
                                 need_importance=need_kv and cfg.eviction.method in eviction.NEEDS_IMPORTANCE,
                                 key_space=key_space or cfg.loss.kv_key_space,
                                 importance_softmax=cfg.eviction.importance_softmax, share_question=share_question)


@dataclass
class KVTargets:
    """The L_KV targets of a teacher batch: for each latent slot, the CoT token eviction kept for it."""

    k: torch.Tensor  # [L, B, Hkv, M, D] teacher CoT keys at the kept positions (graph kept)
    v: torch.Tensor  # [L, B, Hkv, M, D]
    slot_mask: torch.Tensor  # [B, M] True for slots with a target (N_C >= M: all)
    idx: torch.Tensor  # [L, B, Hkv, M] the kept CoT positions, in time order


def kv_targets(t: TeacherOut, tb: TeacherBatch, ev, num_slots: int, generator: torch.Generator | None = None,
               timer=None) -> KVTargets:
    """`eviction.select_indices` (rule `ev.method`, λ `ev.lam`; no gradient) on the teacher's CoT keys and
    importance, then `eviction.gather_slots` of its CoT K and V. ev: the `eviction` config section;
    generator: the `random` rule's draws."""
    timer = timer or _NoTimer()
    with timer("eviction"), torch.no_grad(), _fp32(t.cot_k):
        idx, slot_mask = eviction.select_indices(
            ev.method, keys=t.cot_k.detach(), importance=t.importance, valid=tb.cot_valid,
            num_slots=num_slots, lam=ev.lam, generator=generator)
    with timer("kv_loss"), _fp32(t.cot_k):
        return KVTargets(eviction.gather_slots(t.cot_k, idx), eviction.gather_slots(t.cot_v, idx), slot_mask, idx)


def kv_target_batch(items: list[Tokenized], ids: SpecialIds, cfg) -> TeacherBatch:
    """The teacher batch (with the CoT) whose KV targets the diagnostics and `kava inspect` compute: the
    query rows of `eviction.importance_queries`, as in training."""
    return build_teacher_batch(items, ids, with_cot=True, query_mode=cfg.eviction.importance_queries,
                               tail_window=cfg.eviction.cot_tail_window, codi_position=cfg.loss.codi_position)


def teacher_kv_targets(model: LatentReasoner, tb: TeacherBatch, cfg, num_slots: int,
                       generator: torch.Generator | None = None, *, key_space: str | None = None
                       ) -> tuple[TeacherOut, KVTargets]:
    """`teacher_pass` then `kv_targets` with the run's eviction settings: the targets `loss_step` trains on.
    key_space: default `loss.kv_key_space` (the space L_KV compared keys in)."""
    t = teacher_pass(model, tb, cfg, need_kv=True, key_space=key_space)
    return t, kv_targets(t, tb, cfg.eviction, num_slots, generator)


def head_params(model: LatentReasoner, cfg) -> list | None:
    """The LM head's trainable parameters (none when it is frozen) under `optim.fused_ce`, else None."""
    return [p for p in model.head.parameters() if p.requires_grad] if cfg.optim.fused_ce else None


def ce(out, den: dict | None, term: str, fused: list | None = None) -> torch.Tensor:
    """Token-mean CE of this micro-batch (`out`: a Teacher/StudentOut), or its sum over the step-wide
    denominator (`ce_denominators`; a float or a 0-dim tensor, which a captured CUDA graph reads anew at
    every replay). The [N, V] logits are never kept for backward: the head is recomputed in backward
    (`losses.head_cross_entropy`), or with `fused` (`head_params`) the gradients are formed in the forward
    pass (`losses.fused_head_cross_entropy`)."""
    fn = losses.head_cross_entropy if fused is None else functools.partial(losses.fused_head_cross_entropy,
                                                                             params=fused)
    if den is None:
        return fn(out.label_h, out.targets, out.head, reduction="mean")
    return fn(out.label_h, out.targets, out.head) / den[term]


def student_terms(model: LatentReasoner, batch: Batch, t: TeacherOut | None, cfg,
                  generator: torch.Generator | None = None, timer=None) -> tuple[dict, dict, dict]:
    """The student's passes (latents, then the answer block) and its terms, against the teacher's `t` (None:
    a method without a teacher pass, whose only term is ce_student).

    Returns (terms, weights, extra): 0-dim terms `ce_student`, `codi` and, for methods with L_KV, `kv`; their
    weights in the total; `kv_sweep_<t>` (with `loss.kv_supervision: all`) and `evict/*` statistics.
    """
    timer = timer or _NoTimer()
    spec, lc, sb = cfg.spec, cfg.loss, batch.student
    keep = "all" if lc.kv_supervision == "all" else "last"
    with timer("student_latents"):
        s: StudentOut = model.student_forward(sb, cfg.latent.num_sweeps, student_mode=spec.student,
                                              key_space=lc.kv_key_space, keep_sweeps=keep, with_answer=False,
                                              question_kv=None if t is None else t.question_kv)
    with timer("student_answer"):
        model.answer_pass(sb, s)
    terms, weights, extra = {}, {}, {}
    with timer("losses"):
        terms["ce_student"] = ce(s, batch.ce_den, "ce_student", head_params(model, cfg))
    weights["ce_student"] = lc.ce_student
    if spec.codi:
        with timer("losses"), _fp32(sb.ids):
            terms["codi"] = losses.codi_loss(s.hidden, t.hidden, kind=lc.codi_loss, std=lc.codi_std,
                                             layers=lc.codi_layers)
        weights["codi"] = lc.alpha_codi
    if spec.kv:
        tgt = kv_targets(t, batch.teacher, cfg.eviction, sb.num_latents, generator, timer)
        with timer("kv_loss"), _fp32(sb.ids):
            kv, per_sweep = losses.kv_loss_over_sweeps(
                s.latent_k, s.latent_v, tgt.k, tgt.v, tgt.slot_mask, supervision=lc.kv_supervision,
                kind=lc.kv_loss, layer_std=lc.kv_layer_std)
        terms["kv"] = kv
        weights["kv"] = lc.alpha_kv
        if lc.kv_supervision == "all":
            for i, v in enumerate(per_sweep):
                extra[f"kv_sweep_{i + 1}"] = v.detach()
        for k, v in eviction.eviction_stats(tgt.idx, tgt.slot_mask, batch.teacher.cot_valid).items():
            extra[f"evict/{k}"] = v
    return terms, weights, extra


def loss_step(model: LatentReasoner, batch: Batch, cfg, generator: torch.Generator | None = None,
              timer=None, terms_out: dict | None = None, share_question: bool = True):
    """Forward passes + every loss term of `cfg.method` on one micro-batch.

    Returns (total, log) where log maps names to detached 0-dim tensors: `loss/<term>` for each term,
    `loss/total`, `kv_sweep_<t>` when supervising every sweep, `evict/*` statistics for kava.
    timer: optional callable name -> context manager, used by benchmarks for the per-phase breakdown.
    terms_out: optional dict, filled with term name -> (0-dim term with its graph, weight in the total)
    (for `kava.training.gradshare`).
    share_question: latent methods compute the question block once, for the teacher and the student
    (`LatentReasoner.teacher_forward`): the same losses and gradients as two passes (False: the reference),
    except that any dropout on the question (LoRA's, the backbone's) is one draw for both, not two.
    """
    timer = timer or _NoTimer()
    spec, tb = cfg.spec, batch.teacher
    terms, weights, t = {}, {}, None
    if spec.teacher:
        share = share_question and spec.latent and tb.q_block is not None
        with timer("teacher"):
            t = teacher_pass(model, tb, cfg, need_kv=spec.kv, share_question=share)
        # outside `_fp32`: the LM head runs under the step's autocast (bf16 on GPU); the CE itself is fp32
        terms["ce_teacher"] = ce(t, batch.ce_den, "ce_teacher", head_params(model, cfg))
        weights["ce_teacher"] = cfg.loss.ce_teacher if spec.latent else 1.0
    extra: dict[str, torch.Tensor] = {}
    if spec.latent:
        s_terms, s_weights, extra = student_terms(model, batch, t, cfg, generator, timer)
        terms.update(s_terms)
        weights.update(s_weights)
    if terms_out is not None:
        terms_out.update({k: (terms[k], weights[k]) for k in terms})
    total, log = losses.combine_losses(terms, weights)
    out = {f"loss/{k}": v for k, v in log.items()}
    out.update(extra)
    return total, out


class Objective(torch.nn.Module):
    """The module DDP wraps: forward(batch) = every pass and loss term of the method (`loss_step`)."""

    def __init__(self, model: LatentReasoner, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(cfg.run.seed)  # random eviction (a control)

    def forward(self, batch):
        # on a GPU the eager step gains from no device->host reads as well (DDP cannot be graphed)
        with no_host_sync(enabled=(batch.teacher or batch.student).ids.is_cuda):
            return loss_step(self.model, batch, self.cfg, self.generator)
