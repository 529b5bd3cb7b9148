"""LoRA input dropout fused into the adapter's first matmul, so its dropped copy is never kept for backward.

peft computes `lora_B(lora_A(dropout(x))) * scaling`. Autograd then keeps, per adapted module, the dropped
copy of x (the input `lora_A` needs for its weight gradient) and dropout's mask, on top of x itself, which
the frozen base layer already keeps: with dropout 0.1 on the 7 linears of LLaMA-1B that was ~18% of a
training step's memory (benchmarks/RESULTS.md). `DropoutLinear` replaces `lora_A` (same weight Parameter,
same state-dict key) and the dropout module becomes an identity:

    forward:   y = (x ⊙ m / (1 − p)) Aᵀ          m ~ Bernoulli(1 − p), [..., d] bool
    saved:     x (the base layer's own saved input, no copy), m (1 byte per element), A
    backward:  dx = (dy A) ⊙ m / (1 − p);  dA = dyᵀ (x ⊙ m / (1 − p))   (the dropped x recomputed)

The same function as peft's, with masks from another draw of the same distribution. In eval mode, or with
p = 0, it is a plain linear.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep mask for x: bool, True with probability 1 − p."""
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


class _DropoutMatmul(torch.autograd.Function):
    """(x ⊙ mask · scale) @ wᵀ in x's dtype; keeps x and the bool mask, not the dropped copy."""

    @staticmethod
    def forward(ctx, x, weight, mask, scale: float):
        w = weight.to(x.dtype)  # (what autocast does to the fp32 adapter weight of a bf16 backbone)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x * mask * scale, w)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight.to(x.dtype)) * mask * ctx.scale
        if ctx.needs_input_grad[1]:
            xd = (x * mask * ctx.scale).reshape(-1, x.shape[-1])
            dw = (dy.reshape(-1, dy.shape[-1]).T @ xd).to(weight.dtype)
        return dx, dw, None, None


class DropoutLinear(nn.Linear):
    """`lora_A` with its input dropout (probability `p`) fused in; holds the original module's weight."""

    def __init__(self, linear: nn.Linear, p: float):
        nn.Module.__init__(self)
        if linear.bias is not None:
            raise ValueError("DropoutLinear: lora_A has no bias in peft's LoRA")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        return _DropoutMatmul.apply(x, self.weight, keep_mask(x, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dropout={self.p}"


def fuse_lora_dropout(lm: nn.Module) -> int:
    """Replace, in every peft LoRA linear layer of `lm`, `dropout` + `lora_A` by one `DropoutLinear`.
    Parameters and state-dict keys stay as they are. Returns how many adapters were fused."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in lm.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, drop in list(module.lora_dropout.items()):
            a = module.lora_A[name] if name in module.lora_A else None
            if isinstance(drop, nn.Dropout) and drop.p > 0 and type(a) is nn.Linear:
                module.lora_A[name] = DropoutLinear(a, drop.p)
                module.lora_dropout[name] = nn.Identity()
                n += 1
    return n
