"""Which passes and loss terms each method uses (SPEC §5); methods differ by switches, not by forks.

| method | teacher pass | student pass            | terms                                  |
|--------|--------------|-------------------------|----------------------------------------|
| cot    | CoT sequence | –                       | ce_teacher                             |
| nocot  | no CoT       | –                       | ce_teacher (on the answer)             |
| pccot  | CoT sequence | Jacobi sweeps           | ce_student, ce_teacher, codi           |
| codi   | CoT sequence | sequential latents      | ce_student, ce_teacher, codi           |
| kava   | CoT sequence | Jacobi sweeps           | ce_student, ce_teacher, codi, kv       |
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kava import eviction, losses
from kava.config import Config
from kava.data.format import Tokenized, block_widths, build_student_batch, build_teacher_batch
from kava.model.reasoner import LatentReasoner


@dataclass
class MethodSpec:
    teacher_cot: bool  # teacher sequence contains the CoT
    student: str | None  # None | "jacobi" | "sequential"
    codi: bool
    kv: bool


METHOD_SPECS = {
    "cot": MethodSpec(True, None, False, False),
    "nocot": MethodSpec(False, None, False, False),
    "pccot": MethodSpec(True, "jacobi", True, False),
    "codi": MethodSpec(True, "sequential", True, False),
    "kava": MethodSpec(True, "jacobi", True, True),
}


def student_mode(method: str) -> str:
    """How a method's student produces its latents at inference: "sequential" (CODI), else "jacobi"."""
    return METHOD_SPECS[method].student or "jacobi"


@dataclass
class Batch:
    teacher: object
    student: object | None
    num_tokens: int  # real tokens across both sequences (for tokens/s)
    # Per-term CE denominators shared by all micro-batches of one optimizer step (see `ce_denominators`);
    # None: each micro-batch's CE is a plain mean over its own labels.
    ce_den: dict[str, float] | None = None


def length_key(item: Tokenized) -> int:
    """What `optim.group_by_length` sorts a step's examples by: question + CoT tokens (the teacher's width)."""
    return len(item.question) + len(item.cot)


def label_counts(items: list[Tokenized], cfg: Config) -> dict[str, int]:
    """Labelled tokens of each CE term over `items` (the layout of `kava.data.format`)."""
    spec = METHOD_SPECS[cfg.method]
    teacher = sum((len(i.cot) + len(i.prompt) if spec.teacher_cot else 0) + len(i.answer) for i in items)
    out = {"ce_teacher": teacher}
    if spec.student:
        out["ce_student"] = sum(len(i.answer) for i in items)
    return out


def ce_denominators(step_items: list[Tokenized], cfg: Config, num_micro: int) -> dict[str, float]:
    """Gradient accumulation that does not change the gradient: every micro-batch divides its summed CE by
    (labelled tokens in the whole optimizer step) / (micro-batches in the step), so the mean over
    micro-batches (and ranks) is exactly the token mean over the full effective batch."""
    return {k: max(v, 1) / num_micro for k, v in label_counts(step_items, cfg).items()}


def make_batch(items: list[Tokenized], model_ids, cfg: Config, buckets: float | None = None) -> Batch:
    """The teacher (and student) batch of `items`. Latent methods lay both out in blocks with one question
    block, which `loss_step` runs once for both. buckets: static shapes for CUDA graphs: block widths from the
    geometric series of this growth (`kava.data.format.block_widths`); same losses as without."""
    spec = METHOD_SPECS[cfg.method]
    blocks = buckets is not None or spec.student is not None
    widths = block_widths(items, buckets, with_cot=spec.teacher_cot) if blocks else None
    tb = build_teacher_batch(items, model_ids, with_cot=spec.teacher_cot, query_mode=cfg.eviction.importance_queries,
                             tail_window=cfg.eviction.cot_tail_window, codi_position=cfg.loss.codi_position,
                             widths=widths)
    sb = build_student_batch(items, model_ids, cfg.latent.num_latents, codi_position=cfg.loss.codi_position,
                             widths=widths) if spec.student else None
    n = int(tb.mask.sum()) + (int(sb.mask.sum()) if sb is not None else 0)
    return Batch(tb, sb, n)


def _fp32(like: torch.Tensor):
    """Eviction and losses do their own fp32 math; autocast must not push their matmuls back to bf16."""
    return torch.autocast(like.device.type, enabled=False)


def _ce(out, den: dict | None, term: str) -> torch.Tensor:
    """Token-mean CE of this micro-batch (`out`: a Teacher/StudentOut), or its sum over the step-wide
    denominator (`ce_denominators`; a float or a 0-dim tensor, which a captured CUDA graph reads anew at
    every replay). The [N, V] logits are never kept for backward (`losses.head_cross_entropy`)."""
    if den is None:
        return losses.head_cross_entropy(out.label_h, out.targets, out.head, reduction="mean")
    return losses.head_cross_entropy(out.label_h, out.targets, out.head) / den[term]


class _NoTimer:
    def __call__(self, name: str):
        return contextlib.nullcontext()


def loss_step(model: LatentReasoner, batch: Batch, cfg: Config, generator: torch.Generator | None = None,
              timer=None, terms_out: dict | None = None, share_question: bool = True):
    """Forward passes + every loss term of `cfg.method` on one micro-batch.

    Returns (total, log) where log maps names to detached 0-dim tensors: `loss/<term>` for each term,
    `loss/total`, `kv_sweep_<t>` when supervising every sweep, `evict/*` statistics for kava.
    timer: optional callable name -> context manager, used by benchmarks for the per-phase breakdown.
    terms_out: optional dict, filled with term name -> (0-dim term with its graph, weight in the total)
    (for `kava.gradshare`).
    share_question: latent methods compute the question block once, for the teacher and the student
    (`LatentReasoner.teacher_forward`): the same losses and gradients as two passes (False: the reference),
    except that any dropout on the question (LoRA's, the backbone's) is one draw for both, not two.
    """
    timer = timer or _NoTimer()
    spec = METHOD_SPECS[cfg.method]
    lc, tb, sb = cfg.loss, batch.teacher, batch.student
    need_importance = spec.kv and cfg.eviction.method in ("rkv", "attention")
    share = share_question and spec.student is not None and tb.q_block is not None
    with timer("teacher"):
        t = model.teacher_forward(tb, need_kv=spec.kv, need_importance=need_importance, key_space=lc.kv_key_space,
                                  importance_softmax=cfg.eviction.importance_softmax, share_question=share)
    # outside `_fp32`: the LM head runs under the step's autocast (bf16 on GPU); the CE itself is fp32
    terms = {"ce_teacher": _ce(t, batch.ce_den, "ce_teacher")}
    weights = {"ce_teacher": lc.ce_teacher if spec.student else 1.0}
    extra: dict[str, torch.Tensor] = {}
    if spec.student:
        keep = "all" if lc.kv_supervision == "all" else "last"
        with timer("student_latents"):
            s = model.student_forward(sb, cfg.latent.num_sweeps, mode=spec.student, key_space=lc.kv_key_space,
                                      keep_sweeps=keep, with_answer=False, question_kv=t.question_kv)
        with timer("student_answer"):
            model.answer_pass(sb, s)
        with timer("losses"):
            terms["ce_student"] = _ce(s, batch.ce_den, "ce_student")
        weights["ce_student"] = lc.ce_student
        with timer("losses"), _fp32(sb.ids):
            terms["codi"] = losses.codi_loss(s.hidden, t.hidden, kind=lc.codi_loss, std=lc.codi_std,
                                             layers=lc.codi_layers)
            weights["codi"] = lc.alpha_codi
        if spec.kv:
            with timer("eviction"), torch.no_grad(), _fp32(sb.ids):
                idx, slot_mask = eviction.select_indices(
                    cfg.eviction.method, keys=t.cot_k.detach(), importance=t.importance, valid=tb.cot_valid,
                    num_slots=sb.num_latents, lam=cfg.eviction.lam, generator=generator)
            with timer("kv_loss"), _fp32(sb.ids):
                tk, tv = eviction.gather_slots(t.cot_k, idx), eviction.gather_slots(t.cot_v, idx)
                kv, per_sweep = losses.kv_loss_over_sweeps(
                    s.latent_k, s.latent_v, tk, tv, slot_mask, supervision=lc.kv_supervision, kind=lc.kv_loss,
                    layer_std=lc.kv_layer_std)
            terms["kv"] = kv
            weights["kv"] = lc.alpha_kv
            if lc.kv_supervision == "all":
                for i, v in enumerate(per_sweep):
                    extra[f"kv_sweep_{i + 1}"] = v.detach()
            for k, v in eviction.eviction_stats(idx, slot_mask, tb.cot_valid).items():
                extra[f"evict/{k}"] = v
    if terms_out is not None:
        terms_out.update({k: (terms[k], weights[k]) for k in terms})
    total, log = losses.combine_losses(terms, weights)
    out = {f"loss/{k}": v for k, v in log.items()}
    out.update(extra)
    return total, out
