"""The output projection fused with the cross-entropy: summed over target tokens, chunk by chunk.

The vocabulary projection is computed from the hidden states at the target positions only, in
chunks, and the gradient of each chunk is taken while its logits exist; so peak memory holds one
(chunk, vocab) block instead of (batch, seq, vocab) logits.

A second path, `train.loss_kernel: liger`, runs liger-kernel's Triton kernel of the same sum (CUDA only,
when the liger-kernel package is installed); bench/gpu_check.py compares the two.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError

DEFAULT_CHUNK = 1024


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        # hidden (n, d), weight (vocab, d), targets (n,)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least float32 for sums and softmax
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias).to(acc)  # (chunk, vocab)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand: one exp pass, reused as the softmax (torch.logsumexp is slow on CPU)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: logits are not needed again
            row_sum = probs.sum(dim=-1)
            total += (row_max.squeeze(1) + row_sum.log() - target_logit).sum()
            if need_h or need_w or need_b:
                g = probs.div_(row_sum[:, None])  # softmax, in place
                g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight.to(h.dtype)
                if need_w:
                    if h.dtype == acc:
                        grad_w.addmm_(g.t(), h)  # (vocab, d), no temporary
                    else:
                        grad_w += (g.t() @ h).to(acc)
        grads = [grad_h, grad_w, grad_b]
        ctx.present = [g is not None for g in grads]
        ctx.dtypes = [hidden.dtype, weight.dtype, bias.dtype if bias is not None else None]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        grads = []
        for present, dtype in zip(ctx.present, ctx.dtypes):
            grads.append((next(saved) * grad_out).to(dtype) if present else None)
        return (*grads, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of the projection of `hidden` (n, d) onto `weight` (vocab, d) against `targets` (n,)."""
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


def liger_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor) -> torch.Tensor:
    """The same sum by liger-kernel's fused linear cross-entropy (Triton, CUDA)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)


def check_loss_kernel(kernel: str, device: torch.device) -> None:
    """Refuse `train.loss_kernel: liger` where it cannot run, before the model loads."""
    if kernel != "liger":
        return
    if device.type != "cuda":
        raise ConfigError(f"train.loss_kernel is 'liger', whose Triton kernel runs on CUDA only, and this run is on "
                          f"{device.type}: use train.loss_kernel: chunked (the default), which runs everywhere.")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.loss_kernel is 'liger' but the liger-kernel package is not installed: "
                          "pip install liger-kernel, or use train.loss_kernel: chunked (the default).")
