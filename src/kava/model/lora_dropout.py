"""LoRA input dropout fused into the adapter's first matmul (`lora.fused_dropout`, opt-in; not yet measured).

peft computes `lora_B(lora_A(dropout(x))) * scaling`. Autograd then keeps, per adapted module, the dropped
copy of x (the input `lora_A` needs for its weight gradient) beside x itself, which the frozen base layer
keeps anyway: with dropout 0.1 on the 7 linears of LLaMA-1B, 8.4 GiB of a 46 GiB graphed step
(benchmarks/RESULTS.md). `DropoutLinear` replaces `lora_A` (same weight Parameter, same state-dict key) and
the dropout module becomes an identity:

    forward:   y = (x ⊙ m / (1 − p)) Aᵀ          m ~ Bernoulli(1 − p), [..., d] bool (`torch.native_dropout`)
    saved:     x (the base layer's own saved input, no copy), m (1 byte per element), A
    backward:  dx = (dy A) ⊙ m / (1 − p);  dA = dyᵀ (x ⊙ m / (1 − p))   (the dropped x recomputed)

The same function as peft's, with masks drawn by the same dropout kernel. A first version that built the
mask and the product from separate elementwise ops was 18% slower on the H200 (commit 27338ce, reverted);
this one uses the fused dropout kernel in both directions, one more elementwise pass in backward than peft.
In eval mode, or with p = 0, it is a plain linear.
"""

from __future__ import annotations

import torch
from torch import nn


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ⊙ m / (1 − p), m) with m a bool keep mask, True with probability 1 − p: one fused kernel."""
    return torch.native_dropout(x, p, True)


def _scaled(t: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """t ⊙ mask · scale in one kernel (dropout's own backward)."""
    return torch.ops.aten.native_dropout_backward(t, mask, scale)


class _DropoutMatmul(torch.autograd.Function):
    """dropout(x) @ wᵀ in x's dtype; keeps x and the bool mask, not the dropped copy."""

    @staticmethod
    def forward(ctx, x, weight, p: float):
        xd, mask = dropout(x, p)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.nn.functional.linear(xd, weight.to(x.dtype))  # (autocast's cast of an fp32 adapter)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _scaled(dy @ weight.to(x.dtype), mask, ctx.scale)
        if ctx.needs_input_grad[1]:
            xd = _scaled(x, mask, ctx.scale).reshape(-1, x.shape[-1])
            dw = (dy.reshape(-1, dy.shape[-1]).T @ xd).to(weight.dtype)
        return dx, dw, None


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
        return _DropoutMatmul.apply(x, self.weight, self.p)

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
