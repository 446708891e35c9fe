"""LoRA's dropout, drawn cheaply and kept small: one operation that drops the adapter's input and multiplies it by A.

peft applies LoRA's dropout as `lora_B(lora_A(dropout(x)))`: `nn.Dropout` draws a float mask from torch's random
generator (on the CPU 2.5 ns an element: on SmolLM2-135M, 21% of a LoRA step went to `bernoulli_`), and `lora_A`
then keeps the dropped copy of its input for its weight gradient, one per adapted layer, although q, k and v (and
gate and up) read the same input. Here the mask comes from 16 random bits an element (four to each 64-bit draw, a
tenth of the cost), is kept as one byte an element, and the dropped input is made again in the backward pass from
the input itself, which the layers reading it share. The probability of dropping is p rounded to a multiple of
1/65536 (0.05 becomes 0.0500030518), and kept values are scaled by 1/(1 - that), as nn.Dropout scales by 1/(1 - p).

Vanilla LoRA and rsLoRA only: DoRA's variant reads `lora_dropout` itself, so its layers keep peft's own dropout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LEVELS = 1 << 16  # the mask's random values: 16 bits each


def drop_threshold(p: float) -> tuple[int, float]:
    """(the int16 value below which an element is dropped, the scale of those kept) for dropout probability p."""
    dropped = round(p * LEVELS)
    return -(LEVELS // 2) + dropped, LEVELS / (LEVELS - dropped)


def keep_mask(shape: torch.Size, threshold: int, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`: True where the element's 16 uniform random bits are at or above `threshold`."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)  # all 64 bits
    return bits.view(torch.int16)[:n].view(shape) >= threshold


class _DroppedProjection(torch.autograd.Function):
    """dropout(x) @ weight.T, keeping x (shared with the other layers that read it) and a one-byte mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        keep = keep_mask(x.shape, threshold, x.device)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        # the scale applied to the rank-wide product, not to the layer-wide input: the same value, a fraction of the work
        return F.linear(torch.where(keep, x, 0.0), weight) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, keep = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # under autocast the product ran in grad's dtype; the gradient takes x's
            grad_x = torch.where(keep, grad @ weight.to(grad.dtype), 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x, 0.0).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


class DroppedLinear(torch.nn.Linear):
    """peft's `lora_A` with the adapter's dropout inside it (the same weight Parameter, so the same state dict); in
    eval mode a plain linear layer."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.p = linear.in_features, linear.out_features, p
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.threshold, self.scale = drop_threshold(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight)
        return _DroppedProjection.apply(x, self.weight, self.threshold, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def lean_lora_dropout(model: torch.nn.Module) -> int:
    """Move every vanilla LoRA layer's dropout into its `lora_A` (DroppedLinear; its `lora_dropout` becomes
    nn.Identity); returns how many layers changed."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name] if name in getattr(module, "lora_A", {}) else None
            if (not isinstance(dropout, torch.nn.Dropout) or name in getattr(module, "lora_variant", {})
                    or type(lora_a) is not torch.nn.Linear or lora_a.bias is not None):
                continue
            module.lora_A[name] = DroppedLinear(lora_a, dropout.p).train(lora_a.training)
            dropouts[name] = torch.nn.Identity()
            changed += 1
    return changed
