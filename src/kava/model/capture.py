"""Capture the importance block inside the model's own attention, without `output_attentions`.

Asking HF for attention probabilities forces eager attention and materialises [B, H, S, S] for every
layer. Eviction only needs the answer queries' probabilities over the keys. We register two attention
implementations through transformers' public `AttentionInterface`:

- `kava_sdpa`: SDPA for the output (`model.attn_implementation: sdpa`): HF's SDPA path, or for grouped-query
  attention with a mask `grouped_query_sdpa`, which does not copy the KV heads;
- `kava_eager`: the model's *own* eager attention function (looked up in its modeling module, so family
  specifics such as Gemma2's logit softcapping stay exactly as HF wrote them; `model.attn_implementation:
  eager`, and what `auto` picks for a model HF does not run under SDPA).

While an `ImportanceCapture` is active, either also computes the small block (A answer rows × S keys per
head) from the same post-RoPE queries and keys, the model's own mask and its logit softcap, max-pooled over
each KV group. `install` puts one of them on a loaded model, or refuses with the reason.
"""

from __future__ import annotations

import sys
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from kava.eviction import answer_attention_importance
from kava.model.families import text_config

SDPA_IMPL = "kava_sdpa"
EAGER_IMPL = "kava_eager"
ATTN_IMPL = SDPA_IMPL  # the default capturing implementation (kept under its old name)
ATTN_CHOICES = ("auto", "sdpa", "eager")  # values of `model.attn_implementation`
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
            raise RuntimeError(f"no importance was captured: the model uses attn_implementation="
                               f"{'another implementation'}, not {SDPA_IMPL!r} or {EAGER_IMPL!r} "
                               "(build it through LatentReasoner, which installs one)")
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


def _record(module, query, key, attention_mask, scaling, kwargs) -> None:
    """If a capture is active, add this layer's [B, Hkv, K] importance to it (no gradient)."""
    cap = getattr(_state, "capture", None)
    if cap is None:
        return
    for k in ("s_aux", "sinks"):
        if kwargs.get(k) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses attention sinks ({k}): kava's importance "
                                      "capture does not model them; use eviction.method: cosine or crop")
    B, H, q_len, D = query.shape
    idx = cap.query_idx
    q_sel = torch.gather(query, 2, idx.view(B, 1, -1, 1).expand(B, H, idx.shape[1], D))
    allowed = allowed_rows(attention_mask, idx, q_len, key.shape[2])
    if cap.key_mask is not None:  # Listing 1: renormalise over these columns only
        allowed = allowed & cap.key_mask[:, None, : key.shape[2]].bool()
    scale = scaling if scaling is not None else D ** -0.5
    with torch.no_grad():  # importance is a selection signal: it never carries gradient
        cap.per_layer[module.layer_idx] = answer_attention_importance(
            q_sel.detach(), key.detach(), allowed, cap.query_valid, scale, softcap=kwargs.get("softcap"))


def kava_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention that also records the importance block when a capture is active.

    query: [B, H, q, D] (post-RoPE); key, value: [B, Hkv, K, D] (the full cache after update).
    """
    if kwargs.get("softcap") is not None:  # HF's SDPA path would silently drop it
        raise ValueError(f"{type(module).__name__} uses attention logit softcapping, which SDPA cannot apply; "
                         "set model.attn_implementation: eager (or auto)")
    _record(module, query, key, attention_mask, scaling, kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups == 1 or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1 \
            or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "sinks")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return grouped_query_sdpa(query, key, value, attention_mask, dropout, scaling), None


def grouped_query_sdpa(query, key, value, mask, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Masked SDPA for grouped-query attention without copying the KV heads.

    HF's SDPA path repeats every KV head for its query heads (`repeat_kv`) whenever a mask is given: a copy
    of the whole K and V per layer and pass (of the whole cache at every decode step), kept for backward.
    Instead the G query heads of a KV head are folded into the query-row axis, which the mask rows follow:
    query [B, H, q, D] -> [B, Hkv, G·q, D] (head h = kv·G + r, as `repeat_kv` pairs them), mask
    [B, 1, q, K] -> [B, 1, G·q, K]. Same attention, each row against the same keys.

    query: [B, H, q, D]; key, value: [B, Hkv, K, D]; mask: bool [B or 1, 1, q, K] (True = attend).
    Returns [B, q, H, D] (HF's attention-output layout).
    """
    B, H, q, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    qf = query.reshape(B, Hkv, G * q, D)
    m = mask[:, :, None].expand(mask.shape[0], 1, G, q, mask.shape[-1]).reshape(mask.shape[0], 1, G * q, -1)
    out = torch.nn.functional.scaled_dot_product_attention(qf, key, value, attn_mask=m, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(B, H, q, value.shape[-1]).transpose(1, 2).contiguous()


def module_eager_attention(module):
    """The eager attention function of `module`'s own modeling file (`eager_attention_forward`)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__module__} has no eager_attention_forward: kava cannot run "
                                  f"{type(module).__name__} under model.attn_implementation: eager")
    return fn


def kava_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The model's own eager attention that also records the importance block when a capture is active.

    query: [B, H, q, D] (post-RoPE); key, value: [B, Hkv, K, D]; attention_mask: additive [B, 1, q, K].
    """
    _record(module, query, key, attention_mask, scaling, kwargs)
    return module_eager_attention(module)(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)


def _uses_softcap(config) -> bool:
    return getattr(text_config(config), "attn_logit_softcapping", None) is not None


def install(lm, requested: str = "auto") -> str:
    """Switch a loaded HF model (or peft wrapper) to kava's capturing attention; returns the name installed.

    requested (`model.attn_implementation`): "sdpa" -> `kava_sdpa`; "eager" -> `kava_eager`; "auto" ->
    `kava_sdpa` where HF runs the model under SDPA and it has no attention softcapping, else `kava_eager`.
    Raises ValueError naming the key when the model cannot run the requested one.
    """
    if requested not in ATTN_CHOICES:
        raise ValueError(f"model.attn_implementation: {requested!r} is not allowed; allowed values: "
                         f"{', '.join(ATTN_CHOICES)}" + (" (flash attention cannot expose the importance block "
                                                          "kava captures, nor take its masks)" if "flash" in requested else ""))
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if requested == "auto":
        requested = "eager" if _uses_softcap(base.config) else "sdpa"
        if requested == "sdpa":
            try:
                base.set_attn_implementation(SDPA_IMPL)
                return SDPA_IMPL
            except (ValueError, ImportError):
                requested = "eager"
    if requested == "sdpa" and _uses_softcap(base.config):
        raise ValueError(f"model.attn_implementation: sdpa cannot apply {type(base).__name__}'s attention logit "
                         "softcapping (attn_logit_softcapping); use eager or auto")
    name = SDPA_IMPL if requested == "sdpa" else EAGER_IMPL
    try:
        base.set_attn_implementation(name)
    except (ValueError, ImportError) as e:
        raise ValueError(f"model.attn_implementation: {requested} is not available for {type(base).__name__} "
                         f"({str(e).splitlines()[0]}); use auto") from e
    return name


class no_host_sync:
    """Context manager: while active, kava's SDPA mask never asks whether the padding mask is all ones.

    HF skips an all-ones mask (to let SDPA run plain causal), which reads the mask on the host: a device
    sync, forbidden inside CUDA-graph capture (`kava.training.graphs`). Inside, the mask is always materialised; the
    attention result is the same either way. enabled=False: a no-op (on a CPU there is no read to save, and
    the unmasked causal path is the faster one)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        self._was = getattr(_state, "no_sync", False)
        _state.no_sync = self._was or self.enabled
        return self

    def __exit__(self, *exc):
        _state.no_sync = self._was
        return False


def kava_sdpa_mask(*args, **kwargs):
    if getattr(_state, "no_sync", False):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(SDPA_IMPL, kava_sdpa_attention)
AttentionMaskInterface.register(SDPA_IMPL, kava_sdpa_mask)
AttentionInterface.register(EAGER_IMPL, kava_eager_attention)
AttentionMaskInterface.register(EAGER_IMPL, eager_mask)
