"""Loss terms of KaVa and its baselines (SPEC §4).

Pure tensor functions: tensors in, a 0-dim fp32 tensor out; fp32 math; targets and teachers detached
inside (stop-gradient); masking by ``torch.where`` (static shapes, no host-device syncs). When nothing is
valid a loss is an exact 0 that still carries the graph, so ``backward()`` works on every rank.

Shapes:
    L layers, B batch, Hkv KV heads, M latent slots, D head dim, d hidden size, N tokens, V vocabulary.

Total loss (SPEC §4):  ``CE_student + CE_teacher + alpha1 * L_CODI + alpha2 * L_KV``  via ``combine_losses``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

KINDS = ("l1", "mse", "smooth_l1")
SUPERVISION = ("last", "all")
CODI_STD = ("layer", "global", "none")


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def elementwise(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unreduced distance between ``a`` and ``b`` (same shape), fp32.

    ``l1``: ``|a - b|``;  ``mse``: ``(a - b)**2``;  ``smooth_l1`` (beta = 1):
    ``0.5 * (a - b)**2`` where ``|a - b| < 1``, else ``|a - b| - 0.5``.
    """
    _check("loss kind", kind, KINDS)
    a, b = a.float(), b.float()
    if kind == "l1":
        return (a - b).abs()
    if kind == "mse":
        return (a - b).square()
    return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)


def _masked_layer_std(t: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Std of ``t`` ``[L, ...]`` over the elements where ``mask`` (broadcast to t) is True, per layer.

    Returns ``[L, 1, 1, ...]`` (broadcastable against t), unbiased (``n - 1``, as ``torch.std``),
    clamped below at ``eps``. Reference: ``torch.stack([t[l][mask[l]].std() for l in range(L)])``.
    """
    mask = mask.expand(t.shape)
    dims = tuple(range(1, t.dim()))
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    n = mask.sum(dim=dims, keepdim=True).to(t.dtype)  # [L, 1, ...]
    mean = torch.where(mask, t, zero).sum(dim=dims, keepdim=True) / n.clamp_min(1.0)
    var = torch.where(mask, (t - mean).square(), zero).sum(dim=dims, keepdim=True) / (n - 1.0).clamp_min(1.0)
    return var.sqrt().clamp_min(eps)


def kv_loss(
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    target_k: torch.Tensor,
    target_v: torch.Tensor,
    slot_mask: torch.Tensor,
    *,
    kind: str = "smooth_l1",
    layer_std: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``L_KV``: distance between the student's latent-slot K/V and the selected teacher K/V.

    Args:
        student_k, student_v: ``[L, B, Hkv, M, D]`` latent-slot keys/values of the student.
        target_k, target_v: ``[L, B, Hkv, M, D]`` selected teacher keys/values (detached here).
        slot_mask: ``[B, M]`` bool, True for slots that have a target.
        kind: ``l1 | mse | smooth_l1`` (elementwise, see ``elementwise``).
        layer_std: divide student and target of layer l by the std of the target over its valid elements
            of layer l (detached; unbiased; separately for K and V; clamped below at ``eps``).

    Returns:
        0-dim fp32: ``0.5 * (loss_K + loss_V)``, each the mean of the elementwise loss over valid elements
        (all layers, KV heads, valid slots, head dims). Exact 0 with graph when no slot is valid.

    Reference::

        for X in (K, V):
            for l: s_l, t_l = S[l], T[l].detach();  if layer_std: sigma = t_l[valid].std(); s_l /= sigma; t_l /= sigma
            loss_X = mean over (l, b, h, j valid, d) of elementwise(s_l - t_l)
        L_KV = (loss_K + loss_V) / 2
    """
    _check("loss kind", kind, KINDS)
    if not (student_k.shape == student_v.shape == target_k.shape == target_v.shape) or student_k.dim() != 5:
        raise ValueError(
            "student_k, student_v, target_k, target_v must all be [L,B,Hkv,M,D]; got "
            f"{tuple(student_k.shape)}, {tuple(student_v.shape)}, {tuple(target_k.shape)}, {tuple(target_v.shape)}"
        )
    _, B, _, M, _ = student_k.shape
    if tuple(slot_mask.shape) != (B, M):
        raise ValueError(f"slot_mask must be [B,M]={(B, M)}; got {tuple(slot_mask.shape)}")
    mask = slot_mask.bool()[None, :, None, :, None]  # [1, B, 1, M, 1]

    def one(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s, t = student.float(), target.detach().float()
        if layer_std:
            sigma = _masked_layer_std(t, mask, eps)  # [L, 1, 1, 1, 1], detached (t is)
            s, t = s / sigma, t / sigma
        err = elementwise(kind, s, t)  # [L, B, Hkv, M, D]
        n = mask.expand(err.shape).sum().clamp_min(1).to(err.dtype)
        return torch.where(mask, err, torch.zeros((), dtype=err.dtype, device=err.device)).sum() / n

    return 0.5 * (one(student_k, target_k) + one(student_v, target_v))


def kv_loss_over_sweeps(
    student_ks: Sequence[torch.Tensor],
    student_vs: Sequence[torch.Tensor],
    target_k: torch.Tensor,
    target_v: torch.Tensor,
    slot_mask: torch.Tensor,
    *,
    supervision: str = "last",
    **kv_kwargs,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``L_KV`` over the T Jacobi sweeps (``kv_supervision``).

    Args:
        student_ks, student_vs: T tensors ``[L, B, Hkv, M, D]`` each, sweep 1..T in order.
        target_k, target_v, slot_mask, **kv_kwargs: as in ``kv_loss`` (same targets for every sweep).
        supervision: ``"last"`` (the paper: final sweep only) or ``"all"`` (mean over the T sweeps).

    Returns:
        ``(loss, per_sweep)``: the 0-dim loss to optimise and a list of T detached 0-dim values for
        logging as ``kv_sweep_1..T``. With ``"last"`` the non-final values are computed under no_grad.
    """
    _check("kv supervision", supervision, SUPERVISION)
    if len(student_ks) == 0 or len(student_ks) != len(student_vs):
        raise ValueError(
            f"need one student K and V per sweep (at least one); got {len(student_ks)} K and {len(student_vs)} V"
        )
    T = len(student_ks)
    if supervision == "all":
        terms = [kv_loss(k, v, target_k, target_v, slot_mask, **kv_kwargs) for k, v in zip(student_ks, student_vs)]
        loss = torch.stack(terms).mean()
        return loss, [t.detach() for t in terms]
    with torch.no_grad():
        early = [
            kv_loss(k, v, target_k, target_v, slot_mask, **kv_kwargs)
            for k, v in zip(student_ks[: T - 1], student_vs[: T - 1])
        ]
    loss = kv_loss(student_ks[-1], student_vs[-1], target_k, target_v, slot_mask, **kv_kwargs)
    return loss, [*early, loss.detach()]


def codi_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    *,
    kind: str = "smooth_l1",
    std: str = "layer",
    layers: Sequence[int] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``L_CODI``: hidden-state distance at the answer-prompt's last token, teacher detached.

    Args:
        student_h, teacher_h: ``[L, B, d]`` hidden states of each transformer layer at that position.
        kind: ``l1 | mse | smooth_l1``.
        std: ``"layer"``: divide layer l's loss by the std of ``teacher_h[l]`` over ``[B, d]``;
            ``"global"``: by the std of the teacher over all selected layers; ``"none"``: no division.
            Std is unbiased (``torch.std``), clamped below at ``eps``.
        layers: layer indices to use (negative allowed), default all L.

    Returns:
        0-dim fp32: mean over the selected layers of ``mean_{B,d} elementwise(s_l, t_l) / std_l``.

    Reference::

        sel = layers or range(L)
        g = teacher_h[sel].std()
        mean([elementwise(student_h[l], teacher_h[l]).mean() / {teacher_h[l].std() | g | 1} for l in sel])
    """
    _check("loss kind", kind, KINDS)
    _check("codi std", std, CODI_STD)
    if student_h.shape != teacher_h.shape or student_h.dim() != 3:
        raise ValueError(
            f"student_h and teacher_h must both be [L,B,d]; got {tuple(student_h.shape)} and {tuple(teacher_h.shape)}"
        )
    L = student_h.shape[0]
    s, t = student_h.float(), teacher_h.detach().float()
    if layers is not None:
        sel = [int(i) for i in layers]
        if not sel or any(not -L <= i < L for i in sel):
            raise ValueError(f"layers must be a non-empty list of indices in [-{L}, {L}); got {list(layers)}")
        # integer views, not an index tensor: no host-to-device copy inside a captured CUDA graph
        s, t = torch.stack([s[i % L] for i in sel]), torch.stack([t[i % L] for i in sel])  # [L', B, d]
    per_layer = elementwise(kind, s, t).flatten(1).mean(-1)  # [L']
    if std == "layer":
        per_layer = per_layer / t.flatten(1).std(dim=-1).clamp_min(eps)
    elif std == "global":
        per_layer = per_layer / t.std().clamp_min(eps)
    return per_layer.mean()


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy in fp32.

    Args:
        logits: ``[N, V]`` (any float dtype; upcast).
        labels: ``[N]`` long; entries equal to ``ignore_index`` are skipped.

    Returns:
        0-dim fp32 mean over the non-ignored labels; exact 0 with graph when every label is ignored
        (where ``F.cross_entropy(reduction="mean")`` would give NaN).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N,V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    n = (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total / n


def head_cross_entropy(h: torch.Tensor, labels: torch.Tensor, head, *, reduction: str = "sum",
                       chunk_rows: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of ``head(h)`` against ``labels`` without keeping the ``[N, V]`` logits for backward.

    Args:
        h: ``[N, d]`` hidden states; labels: ``[N]`` (``ignore_index`` skipped); head: ``[n, d] -> [n, V]``.
        reduction: ``"sum"`` or ``"mean"`` (over the non-ignored labels; 0 when there are none).

    Each chunk of ``chunk_rows`` rows is activation-checkpointed: its logits (and their fp32 copy and
    log-softmax) exist only while that chunk's loss or gradient is computed, and are recomputed in
    backward. Held from the forward to the backward, they were ``N x V x 10`` bytes under bf16 autocast
    (bf16 logits + fp32 copy + fp32 log-softmax): several GiB for a 128k vocabulary. Same value as
    ``token_cross_entropy`` on ``head(h)`` (summed for ``"sum"``), up to the order of the fp32 sums. The head
    runs under the caller's autocast, and must be deterministic: the recomputation does not replay RNG
    draws (`lora.target_modules` may therefore not adapt the LM head with dropout).
    """
    from torch.utils.checkpoint import checkpoint

    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"h must be [N,d] and labels [N]; got {tuple(h.shape)} and {tuple(labels.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: {reduction!r}; allowed values: sum, mean")

    def chunk_sum(hc, lc):
        return F.cross_entropy(head(hc).float(), lc, ignore_index=ignore_index, reduction="sum")

    total = None
    for i in range(0, h.shape[0], chunk_rows):
        # the head has no randomness: no RNG state to save (saving it is not allowed inside a CUDA graph capture)
        part = checkpoint(chunk_sum, h[i:i + chunk_rows], labels[i:i + chunk_rows], use_reentrant=False,
                          preserve_rng_state=False)
        total = part if total is None else total + part
    if total is None:  # no rows: an exact 0 that still carries a graph
        total = h.float().sum() * 0.0
    if reduction == "mean":
        total = total / (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total


class _FusedHeadCE(torch.autograd.Function):
    """The summed CE of `head(h)` whose gradients are formed in the forward pass, chunk by chunk: each chunk's
    logits exist only while its loss and their gradient (to `h` and to the head's trainable `params`) are
    computed; backward scales the saved gradients by the upstream one."""

    @staticmethod
    def forward(ctx, h, labels, head, chunk_rows, ignore_index, *params):
        grad_h = torch.zeros_like(h)
        grad_p = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk_rows):
            with torch.enable_grad():
                hc = h[i:i + chunk_rows].detach().requires_grad_(True)
                loss = F.cross_entropy(head(hc).float(), labels[i:i + chunk_rows], ignore_index=ignore_index,
                                       reduction="sum")
                grads = torch.autograd.grad(loss, [hc, *params], allow_unused=True)
            total = total + loss.detach()
            grad_h[i:i + chunk_rows] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                if g is not None:
                    acc.add_(g)
        ctx.save_for_backward(grad_h, *grad_p)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, *grad_p = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), None, None, None, None,
                *(g * grad_out.to(g.dtype) for g in grad_p))


def fused_head_cross_entropy(h: torch.Tensor, labels: torch.Tensor, head, params=(), *, reduction: str = "sum",
                             chunk_rows: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """`head_cross_entropy` with each chunk's gradient formed in the forward pass (`optim.fused_ce`).

    Args as `head_cross_entropy`; params: the head's parameters that train (a frozen head: none). Every
    other parameter the head reaches gets no gradient from this loss.

    The checkpointed CE runs the head's matmul on every labelled row three times (forward, recomputation,
    gradient to h; four with a trainable head); here twice (three). What is kept for backward is the gradient
    itself: ``[N, d]`` for h and one tensor the size of each trainable parameter (a trainable head's weight:
    V x d more memory, where the checkpointed CE keeps nothing). Same value and gradients up to the order of
    the fp32 sums (tests). The head must be deterministic (no dropout), as for `head_cross_entropy`.
    """
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"h must be [N,d] and labels [N]; got {tuple(h.shape)} and {tuple(labels.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: {reduction!r}; allowed values: sum, mean")
    total = _FusedHeadCE.apply(h, labels, head, chunk_rows, ignore_index, *params)
    if reduction == "mean":
        total = total / (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total


def combine_losses(
    terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total of named loss terms, and a log of every term.

    Args:
        terms: name -> 0-dim loss, e.g. ``{"ce_student", "ce_teacher", "codi", "kv"}``.
        weights: name -> float weight; must name exactly the keys of ``terms`` (weight 0 = log only).

    Returns:
        ``(total, log)``: ``total = sum(weights[n] * terms[n] for n with weights[n] != 0)`` (an fp32 0 without
        graph if every weight is 0); ``log`` has every term detached plus ``"total"`` (detached).
        A zero-weight term never touches ``total`` (so a NaN in it cannot leak in).
    """
    if not terms:
        raise ValueError("combine_losses needs at least one term")
    if "total" in terms:
        raise ValueError("'total' is reserved for the combined loss; rename that term")
    if set(terms) != set(weights):
        missing = sorted(set(terms) - set(weights))
        unknown = sorted(set(weights) - set(terms))
        raise ValueError(
            f"every loss term needs a weight (0 to only log it) and every weight a term; "
            f"terms without weight: {missing}, weights without term: {unknown}"
        )
    total: torch.Tensor | None = None
    for name, term in terms.items():
        w = float(weights[name])
        if w != 0.0:
            contrib = w * term.float()
            total = contrib if total is None else total + contrib
    if total is None:
        total = torch.zeros((), dtype=torch.float32, device=next(iter(terms.values())).device)
    log = {name: term.detach().float() for name, term in terms.items()}
    log["total"] = total.detach()
    return total, log
