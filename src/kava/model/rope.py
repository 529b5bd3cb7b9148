"""Each decoder layer's own rotary embedding, to move keys between cache space and pre-RoPE space.

`loss.kv_key_space: pre_rope` needs the keys as they were before the rotary embedding. Families differ in
how they rotate, so nothing here re-implements a family's RoPE: for layer l we call

- the decoder's own rotary module for that layer's cos/sin (with the layer's type where the module takes
  one: Gemma3 / OLMo3 local vs global RoPE),
- the layer's own `apply_rotary_pos_emb` from its modeling file (half-split or interleaved pairs, Cohere),
- on the first `cos.shape[-1]` dims of the head only (partial rotary: Phi3 `partial_rotary_factor`, StableLM,
  GPT-NeoX `rotary_pct`; the rest of the head passes through),
- and nothing for layers that skip RoPE (SmolLM3's `no_rope_layers`: the attention's `use_rope` is false).

Undoing a rotation by θ (scaled by m, as YaRN-style `attention_scaling` does: cos = m·cos θ, sin = m·sin θ)
is applying it with cos/(cos²+sin²) and −sin/(cos²+sin²): that is m⁻¹·R(−θ) = (m·R(θ))⁻¹.

A family whose structure this cannot read is refused (`RopeUnsupported`). A structure it reads but gets
wrong cannot stay silent either: `kava.model.reasoner:LatentReasoner.check_pre_rope` verifies the result at
model-build time (pre-RoPE keys of a RoPE model do not change when every position shifts by the same amount).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn as nn


class RopeUnsupported(ValueError):
    """This model's rotary embedding cannot be undone per layer; the message says why."""


def attention_module(layer: nn.Module, l: int) -> nn.Module:
    """The self-attention submodule of decoder layer `l` (the module HF gives `layer_idx`)."""
    for mod in layer.modules():
        if "Attention" in type(mod).__name__ and getattr(mod, "layer_idx", None) == l:
            return mod
    for mod in layer.modules():
        if "Attention" in type(mod).__name__:
            return mod
    raise RopeUnsupported(f"{type(layer).__name__}: no attention submodule found")


def decoder_layers(decoder: nn.Module) -> list[nn.Module]:
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise RopeUnsupported(f"{type(decoder).__name__}: no list of decoder layers found")


class LayerRopes:
    """Per-layer rotation of keys. k: [L, B, Hkv, N, D]; pos: [B, N] (the positions the keys sit at)."""

    def __init__(self, decoder: nn.Module, config):
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.rotary = getattr(decoder, "rotary_emb", None)
        self.error: str | None = None
        self.layers: list[tuple[bool, str | None, object]] = []  # (uses RoPE, layer type, apply fn)
        has_rotary = any("rotary" in type(m).__name__.lower() for m in decoder.modules())
        if self.rotary is None:
            if has_rotary:
                self.error = (f"{type(decoder).__name__} keeps its rotary embedding inside the layers, not as "
                              "the decoder's `rotary_emb`")
            return  # no RoPE at all (GPT-2: absolute positions): pre-RoPE keys are the cached keys
        try:
            takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
            types = getattr(self.config, "layer_types", None)
            for l, layer in enumerate(decoder_layers(decoder)):
                attn = attention_module(layer, l)
                use = bool(getattr(attn, "use_rope", True))
                apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
                if use and apply is None:
                    raise RopeUnsupported(f"{type(attn).__module__} has no apply_rotary_pos_emb")
                if takes_type and not types:
                    raise RopeUnsupported(f"{type(self.rotary).__name__} needs a layer type but the config has "
                                          "no layer_types")
                self.layers.append((use, types[l] if takes_type else None, apply))
        except RopeUnsupported as e:
            self.error = str(e)

    @property
    def identity(self) -> bool:
        return self.error is None and not any(use for use, _, _ in self.layers)

    def _check(self) -> None:
        if self.error:
            raise RopeUnsupported(f"loss.kv_key_space: pre_rope is not supported for {self.config.model_type}: "
                                  f"{self.error}; use kv_key_space: cache")

    def _cos_sin(self, k: torch.Tensor, pos: torch.Tensor, layer_type: str | None):
        args = (k, pos) if layer_type is None else (k, pos, layer_type)
        return self.rotary(*args)  # [B, N, r] each

    def _apply(self, k: torch.Tensor, pos: torch.Tensor, inverse: bool) -> torch.Tensor:
        self._check()
        if self.rotary is None:
            return k
        if k.shape[0] != len(self.layers):
            raise ValueError(f"keys for {k.shape[0]} layers, the model has {len(self.layers)}")
        out = []
        cache: dict = {}
        for l, (use, ltype, apply) in enumerate(self.layers):
            kl = k[l]  # [B, Hkv, N, D]
            if not use:
                out.append(kl)
                continue
            if ltype not in cache:
                cos, sin = self._cos_sin(kl, pos, ltype)
                if inverse:
                    n = cos * cos + sin * sin
                    cos, sin = cos / n, -sin / n
                cache[ltype] = (cos, sin)
            cos, sin = cache[ltype]
            r = cos.shape[-1]
            rot, rest = kl[..., :r], kl[..., r:]
            _, rot = apply(rot, rot, cos.to(kl.dtype), sin.to(kl.dtype))
            out.append(torch.cat([rot.to(kl.dtype), rest], -1))
        return torch.stack(out)

    def unrotate(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys as the cache stores them -> before each layer's rotary embedding."""
        return self._apply(k, pos, inverse=True)

    def rotate(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys -> as each layer's cache would store them at positions `pos` (inverse of `unrotate`)."""
        return self._apply(k, pos, inverse=False)
