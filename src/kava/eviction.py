"""Compressing the teacher's CoT KV-cache to M entries per layer and KV head (SPEC §3, R-KV style).

Pure tensor functions: tensors in, tensors out, fp32 math, fully batched (no Python loops over batch,
layer or head), and free of host-device syncs so they can run inside a GPU training step.

Notation used in every docstring:

    L    layers                          B    batch (examples)
    H    query heads                     Hkv  KV heads (H % Hkv == 0; query head h reads KV head h // (H // Hkv),
                                              the grouping of HF ``repeat_kv``)
    C    padded CoT length               M    latent slots (= entries kept per layer/example/KV head)
    D    head dim                        A    number of answer query rows
    K    number of key columns in the attention block (usually the whole prefix; CoT columns are a slice)

The pipeline (one call chain per teacher batch, all under ``torch.no_grad()`` in the trainer):

    I  = answer_attention_importance(q_answer, k_all, allowed, query_valid, scaling)[..., cot_cols]  # per layer
    R  = redundancy_scores(k_cot, valid)
    S  = eviction_scores(I, R, lam)                    # S = lam * I + (1 - lam) * R
    idx, slot_mask = select_indices("rkv", keys=k_cot, importance=I, valid=valid, num_slots=M)
    target_k = gather_slots(k_cot, idx); target_v = gather_slots(v_cot, idx)
"""

from __future__ import annotations

import numbers

import functools

import torch
import torch.nn.functional as F

METHODS = ("rkv", "attention", "cosine", "crop", "random", "uniform")
"""Selection methods: ``rkv`` (the paper: lam*I + (1-lam)*R), ``attention`` (lam=1), ``cosine`` (lam=0),
``crop`` (first M CoT tokens), ``random`` and ``uniform`` (extra controls)."""

NEEDS_IMPORTANCE = ("rkv", "attention")
"""The methods that read the importance block (the teacher pass must capture it)."""


def _check_lam(lam: float) -> None:
    if isinstance(lam, torch.Tensor):
        raise TypeError("lam must be a Python float in [0, 1], not a tensor (checking a tensor would sync the device)")
    if not isinstance(lam, numbers.Real) or not (0.0 <= float(lam) <= 1.0):
        raise ValueError(f"lam must be a float in [0, 1] (1 = attention only, 0 = redundancy only); got {lam!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown eviction method {method!r}; allowed: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------


def answer_attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention the answer rows pay to each key, averaged over rows, max-pooled over each GQA group.

    Args:
        query: ``[B, H, A, D]`` post-RoPE queries of the answer rows (any float dtype; upcast to fp32).
        key: ``[B, Hkv, K, D]`` post-RoPE keys of every column those rows may attend to (the cache).
        allowed: ``[B, A, K]`` bool, True where row a may attend to column k (causal AND not padding).
            The softmax runs over exactly these columns, as the model's attention does.
        query_valid: ``[B, A]`` bool, True for rows that are real answer tokens (not padding).
        scaling: the attention logit scale (``head_dim ** -0.5`` for LLaMA/Qwen).
        softcap: the model's attention logit softcap (Gemma2): logits -> softcap * tanh(logits / softcap)
            before the softmax, as its eager attention does; None = no cap.

    Returns:
        ``[B, Hkv, K]`` fp32 importance. Slice the CoT columns out of it. A row with no allowed column
        contributes zeros (never NaN); an example with no valid row gets all zeros.

    Reference (what this computes, for one example b and KV head g with group size G = H // Hkv)::

        for h in range(g * G, (g + 1) * G):
            for a in valid rows:
                p[h, a, :] = softmax((query[b, h, a] @ key[b, g].T) * scaling over allowed[b, a])  # 0 elsewhere
            imp_h = mean_a p[h, a, :]
        importance[b, g] = max_h imp_h

    The probabilities equal the rows of eager attention (``output_attentions=True``) for these rows and
    columns; only the ``[A, K]`` block is ever formed, never the full ``[T, T]`` matrix of every layer.
    Order of reductions: mean over queries first, then max over the heads of a group (option name
    ``"mean_then_max"`` in docs/method_math.md).
    """
    B, H, A, D = query.shape
    Bk, Hkv, K, Dk = key.shape
    if (Bk, Dk) != (B, D) or H % Hkv != 0:
        raise ValueError(
            f"query [B,H,A,D]={tuple(query.shape)} and key [B,Hkv,K,D]={tuple(key.shape)} must share B and D, "
            f"with H divisible by Hkv"
        )
    if tuple(allowed.shape) != (B, A, K) or tuple(query_valid.shape) != (B, A):
        raise ValueError(
            f"allowed must be [B,A,K]={(B, A, K)} and query_valid [B,A]={(B, A)}; "
            f"got {tuple(allowed.shape)} and {tuple(query_valid.shape)}"
        )
    with torch.autocast(query.device.type, enabled=False):  # fp32 math even inside a bf16 autocast region
        return _importance_fp32(query, key, allowed, query_valid, scaling, softcap)


def _importance_fp32(query, key, allowed, query_valid, scaling: float, softcap: float | None = None) -> torch.Tensor:
    B, H, A, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    q = query.float().reshape(B, Hkv, G, A, D)  # head h = g*G + j  ->  [b, g, j]  (HF repeat_kv grouping)
    k = key.float()
    logits = torch.einsum("bgjad,bgkd->bgjak", q, k) * scaling  # [B, Hkv, G, A, K]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    allow = allowed.bool()[:, None, None, :, :]  # [B, 1, 1, A, K]
    # A finite fill (as HF's additive mask uses) keeps all-masked rows NaN-free; they are zeroed just below.
    logits = logits.masked_fill(~allow, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1) * allow  # [B, Hkv, G, A, K]; exact 0 off the allowed columns
    w = query_valid.to(torch.float32)  # [B, A]
    n_valid = w.sum(-1).clamp_min(1.0)  # [B]
    per_head = torch.einsum("bgjak,ba->bgjk", probs, w) / n_valid[:, None, None, None]  # [B, Hkv, G, K]
    return per_head.amax(dim=2)  # [B, Hkv, K]


# ----------------------------------------------------------------------------------------------------------
# Redundancy and the mix
# ----------------------------------------------------------------------------------------------------------


def _no_autocast(fn):
    """Run `fn` in fp32 even when called inside a bf16 autocast region (its matmuls must not downcast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_no_autocast
def redundancy_scores(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Redundancy score R: high for a key unlike the other CoT keys.

    Args:
        keys: ``[..., C, D]`` CoT keys (e.g. ``[L, B, Hkv, C, D]``), any float dtype.
        valid: ``[..., C]`` bool (broadcastable to ``keys.shape[:-1]``, e.g. ``[B, 1, C]`` against
            ``[L, B, Hkv, C, D]``), True for real CoT tokens.

    Returns:
        ``[..., C]`` fp32; sums to 1 over the valid tokens of each row, exactly 0 on padding (all 0 when
        a row has no valid token).

    Reference (one row, valid tokens ``V`` with ``n = |V|``)::

        cos[i, j] = <k_i, k_j> / (|k_i| |k_j|)      for i, j in V;   cos[i, i] = 0
        r_i       = -(1/n) * sum_{j in V} cos[i, j]
        R         = softmax_{i in V}(r)              # 0 outside V

    Normalisation choice (``"mean_valid"``): divide by the number of valid tokens n (the zeroed diagonal
    included in the count), matching a plain ``mean`` over an unpadded row as R-KV computes it.
    Memory: forms the ``[..., C, C]`` fp32 similarity block one index of the leading dimension (one layer of
    ``[L, B, Hkv, C, D]``) at a time, so the peak is a single layer's pairwise matrix.
    """
    valid = valid.bool().expand(keys.shape[:-1])  # [..., C]
    if keys.dim() > 3:
        return torch.stack([_redundancy(keys[i], valid[i]) for i in range(keys.shape[0])])
    return _redundancy(keys, valid)


def _redundancy(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`redundancy_scores` on one block: keys ``[..., C, D]``, valid ``[..., C]`` (already expanded)."""
    kn = F.normalize(keys.float(), dim=-1, eps=1e-8)  # [..., C, D]
    sim = kn @ kn.transpose(-1, -2)  # [..., C, C]
    C = sim.shape[-1]
    eye = torch.eye(C, dtype=torch.bool, device=sim.device)
    pair = valid[..., :, None] & valid[..., None, :] & ~eye  # [..., C, C]
    sim = torch.where(pair, sim, torch.zeros((), dtype=sim.dtype, device=sim.device))
    n = valid.sum(-1, keepdim=True).clamp_min(1).to(sim.dtype)  # [..., 1]
    neg_mean = -sim.sum(-1) / n  # [..., C]
    neg_mean = neg_mean.masked_fill(~valid, torch.finfo(torch.float32).min)
    return torch.softmax(neg_mean, dim=-1) * valid  # exact 0 on padding and on empty rows


def eviction_scores(importance: torch.Tensor, redundancy: torch.Tensor, lam: float) -> torch.Tensor:
    """Mixed score ``S = lam * I + (1 - lam) * R`` (fp32, same shape ``[..., C]``). ``lam`` in [0, 1]."""
    _check_lam(lam)
    lam = float(lam)
    return lam * importance.float() + (1.0 - lam) * redundancy.float()


# ----------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------


def _uniform_scores(valid: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[B, C]`` fp32: 1 on the valid tokens whose rank among the valid tokens is in
    ``round(linspace(0, n-1, M))`` (computed as ``round(j * (n-1) / (M-1))`` in float64, round half to
    even), else 0. When n <= M every valid token is marked."""
    B, C = valid.shape
    n = valid.sum(-1, keepdim=True).to(torch.float64)  # [B, 1]
    j = torch.arange(num_slots, device=valid.device, dtype=torch.float64)  # [M]
    if num_slots > 1:
        target = torch.round(j * (n - 1.0) / (num_slots - 1))  # [B, M] ranks
    else:
        target = torch.zeros(B, 1, dtype=torch.float64, device=valid.device)
    rank = (valid.cumsum(-1) - 1).to(torch.float64)  # [B, C] rank among valid tokens
    hit = (rank[:, :, None] == target[:, None, :]).any(-1) & valid  # [B, C]
    return hit.to(torch.float32)


@torch.no_grad()
@_no_autocast
def select_indices(
    method: str,
    *,
    keys: torch.Tensor,
    importance: torch.Tensor | None,
    valid: torch.Tensor,
    num_slots: int,
    lam: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which M CoT entries each (layer, example, KV head) keeps, returned in time order.

    Args:
        method: one of ``METHODS``.
        keys: ``[L, B, Hkv, C, D]`` CoT keys (used by ``rkv`` and ``cosine``; gives the shape otherwise).
        importance: ``[L, B, Hkv, C]`` importance (required by ``rkv`` and ``attention``), else ignored.
        valid: ``[B, C]`` bool, True for real CoT tokens (any pattern, not only right padding).
        num_slots: M.
        lam: mix weight for ``rkv``; must be in [0, 1] (checked for every method).
        generator: RNG for ``random`` (on the device of ``keys``).

    Returns:
        ``idx`` ``[L, B, Hkv, M]`` long, ascending over the used slots of each row, never a padding
        position where ``slot_mask`` is True; and ``slot_mask`` ``[B, M]`` bool. With ``n_b`` valid tokens
        and ``n_b < M``, example b's tokens fill slots ``0..n_b-1`` in order, slots ``n_b..M-1`` are masked
        (False) and their idx is 0.

    How (every method reduces to a score, then the same top-M):
        score = S (rkv) | I (attention) | R (cosine) | -position (crop) | U(0,1) (random) | 1 on the
        uniform-stride ranks, 0 elsewhere (uniform);  score[padding] = -inf
        top = topk(score, min(M, C))                      # the top min(n, M) picks are the valid ones
        key = top if picked token valid else top + C      # sort valid picks first, in time order
        idx = sort(key)[..., :M] where < C, else 0

    Reference loop (tests/test_eviction.py has it as code)::

        for l, b, h: V = valid positions of b; keep = sorted(top-M of V by score[l, b, h]); idx = keep + [0]*pad
    """
    _check_method(method)
    _check_lam(lam)
    if keys.dim() != 5:
        raise ValueError(f"keys must be [L,B,Hkv,C,D]; got shape {tuple(keys.shape)}")
    L, B, Hkv, C, _ = keys.shape
    if tuple(valid.shape) != (B, C):
        raise ValueError(f"valid must be [B,C]={(B, C)}; got {tuple(valid.shape)}")
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int; got {num_slots!r}")
    M = num_slots
    valid = valid.bool()
    device = keys.device
    if method in NEEDS_IMPORTANCE:
        if importance is None:
            raise ValueError(f"method {method!r} needs importance [L,B,Hkv,C]; got None")
        if tuple(importance.shape) != (L, B, Hkv, C):
            raise ValueError(f"importance must be [L,B,Hkv,C]={(L, B, Hkv, C)}; got {tuple(importance.shape)}")

    shape = (L, B, Hkv, C)
    if method == "rkv":
        score = eviction_scores(importance, redundancy_scores(keys, valid[None, :, None, :]), lam)
    elif method == "attention":
        score = importance.float()
    elif method == "cosine":
        score = redundancy_scores(keys, valid[None, :, None, :])
    elif method == "crop":
        score = -torch.arange(C, device=device, dtype=torch.float32).expand(shape)
    elif method == "random":
        score = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    else:  # "uniform"
        score = _uniform_scores(valid, M)[None, :, None, :].expand(shape)

    valid_lbhc = valid[None, :, None, :].expand(shape)  # [L, B, Hkv, C]
    score = score.masked_fill(~valid_lbhc, float("-inf"))
    k = min(M, C)
    top = torch.topk(score, k, dim=-1).indices  # [L, B, Hkv, k]
    picked_valid = torch.gather(valid_lbhc, -1, top)  # [L, B, Hkv, k]
    order_key = torch.where(picked_valid, top, top + C)  # valid picks first, each group in time order
    order_key = torch.sort(order_key, dim=-1).values
    idx = torch.where(order_key < C, order_key, torch.zeros_like(order_key))  # [L, B, Hkv, k]
    if k < M:  # fewer CoT columns than slots: pad with masked slots
        idx = torch.cat([idx, idx.new_zeros(L, B, Hkv, M - k)], dim=-1)

    n = valid.sum(-1, keepdim=True)  # [B, 1]
    slot_mask = torch.arange(M, device=device)[None, :] < n  # [B, M]; j < min(n, M)
    return idx, slot_mask


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick the kept entries: ``x`` ``[L, B, Hkv, C, D]``, ``idx`` ``[L, B, Hkv, M]`` -> ``[L, B, Hkv, M, D]``.

    ``out[l, b, h, j] = x[l, b, h, idx[l, b, h, j]]``. Keeps x's dtype and autograd graph.
    """
    D = x.shape[-1]
    return torch.gather(x, 3, idx[..., None].expand(*idx.shape, D))


@torch.no_grad()
def eviction_stats(idx: torch.Tensor, slot_mask: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagnostics of one selection, as 0-dim fp32 tensors (no host sync; call ``.item()`` when logging).

    Args:
        idx: ``[L, B, Hkv, M]`` from ``select_indices``.
        slot_mask: ``[B, M]`` bool.
        valid: ``[B, C]`` bool.

    Returns:
        ``masked_slot_frac``: fraction of the B*M slots without a target.
        ``kept_rel_pos``: mean over used slots (all layers and heads) of the kept token's rank among its
            example's valid CoT tokens divided by ``max(n - 1, 1)``; in [0, 1] (0 = start of the CoT).
            0 when no slot is used.
        ``short_cot_frac``: fraction of examples with fewer valid CoT tokens than slots (n < M).
        ``cot_len_mean``: mean number of valid CoT tokens per example.
    """
    L, B, Hkv, M = idx.shape
    valid = valid.bool()
    n = valid.sum(-1).to(torch.float32)  # [B]
    rank = (valid.cumsum(-1) - 1).to(torch.float32)  # [B, C]
    kept_rank = torch.gather(rank[None, :, None, :].expand(L, B, Hkv, rank.shape[-1]), -1, idx)  # [L,B,Hkv,M]
    rel = kept_rank / (n - 1.0).clamp_min(1.0)[None, :, None, None]
    used = slot_mask[None, :, None, :].expand(L, B, Hkv, M)
    n_used = used.sum().clamp_min(1).to(torch.float32)
    return {
        "masked_slot_frac": 1.0 - slot_mask.to(torch.float32).mean(),
        "kept_rel_pos": torch.where(used, rel, torch.zeros_like(rel)).sum() / n_used,
        "short_cot_frac": (n < M).to(torch.float32).mean(),
        "cot_len_mean": n.mean(),
    }
