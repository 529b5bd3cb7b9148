"""Capture the importance block inside the model's own attention, without `output_attentions`.

Asking HF for attention probabilities forces eager attention and materialises [B, H, S, S] for every
layer. Eviction only needs the answer queries' probabilities over the keys. We register an attention
implementation, `kava_sdpa`, through transformers' public `AttentionInterface`: it runs the normal SDPA
kernel for the output and, while an `ImportanceCapture` is active, also computes the small block
(A answer rows × S keys per head) from the same post-RoPE queries and keys, max-pooled over each KV group.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kava.eviction import answer_attention_importance

ATTN_IMPL = "kava_sdpa"
_state = threading.local()


class ImportanceCapture:
    """Context manager: while active, `kava_sdpa` attention records, per layer, [B, Hkv, S] importance.

    query_idx, query_valid: [B, A] columns (of the current forward's queries) and their validity.
    key_mask: optional [B, K] bool, the only key columns the importance softmax runs over (the CoT span
        for the paper's Listing 1); None = every key the query may attend to (the model's own softmax).
    After the forward, `per_layer[l]` holds [B, Hkv, K] (K = keys seen by that layer).
    """

    def __init__(self, query_idx: torch.Tensor, query_valid: torch.Tensor, key_mask: torch.Tensor | None = None):
        self.query_idx = query_idx
        self.query_valid = query_valid
        self.key_mask = key_mask
        self.per_layer: dict[int, torch.Tensor] = {}

    def __enter__(self):
        if getattr(_state, "capture", None) is not None:
            raise RuntimeError("nested ImportanceCapture")
        _state.capture = self
        return self

    def __exit__(self, *exc):
        _state.capture = None
        return False

    def stacked(self) -> torch.Tensor:
        """[L, B, Hkv, K]"""
        if not self.per_layer:
            raise RuntimeError(f"no importance was captured: the model does not use attn_implementation={ATTN_IMPL!r}")
        return torch.stack([self.per_layer[i] for i in sorted(self.per_layer)])


def allowed_rows(attention_mask: torch.Tensor | None, query_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Which keys each selected query may attend to: [B, A, K] bool.

    attention_mask: the 4D mask the model passed to attention ([B, 1, q, K] bool, True = attend; or additive
    float), or None when SDPA runs as plain causal (then query row i sees keys <= i + kv_len - q_len).
    """
    B, A = query_idx.shape
    if attention_mask is None:
        cols = torch.arange(kv_len, device=query_idx.device)
        return cols.view(1, 1, kv_len) <= (query_idx + (kv_len - q_len)).unsqueeze(-1)
    m = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask  # [B or 1, q, K]
    m = m.expand(B, -1, -1)
    rows = torch.gather(m, 1, query_idx.unsqueeze(-1).expand(B, A, m.shape[-1]))
    return rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2


def kava_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention that also records the importance block when a capture is active.

    query: [B, H, q, D] (post-RoPE); key, value: [B, Hkv, K, D] (the full cache after update).
    """
    cap = getattr(_state, "capture", None)
    if cap is not None:
        B, H, q_len, D = query.shape
        idx = cap.query_idx
        q_sel = torch.gather(query, 2, idx.view(B, 1, -1, 1).expand(B, H, idx.shape[1], D))
        allowed = allowed_rows(attention_mask, idx, q_len, key.shape[2])
        if cap.key_mask is not None:  # Listing 1: renormalise over these columns only
            allowed = allowed & cap.key_mask[:, None, : key.shape[2]].bool()
        scale = scaling if scaling is not None else D ** -0.5
        with torch.no_grad():  # importance is a selection signal: it never carries gradient
            cap.per_layer[module.layer_idx] = answer_attention_importance(
                q_sel.detach(), key.detach(), allowed, cap.query_valid, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPL, kava_sdpa_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
