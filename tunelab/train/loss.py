"""The supervised fine-tuning loss: summed cross-entropy over target tokens only.

The vocabulary projection is computed from the decoder's hidden states at the label positions
only, in chunks, and the gradient of each chunk is taken while its logits exist; so peak memory
holds one (chunk, vocab) block instead of (batch, seq, vocab) logits. The caller divides the sum
by the number of target tokens in the whole optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.encode import IGNORE
from tunelab.strategies.model import TrainModel

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


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over target tokens; divide by the step's target-token count
    num_label_tokens: int
    num_correct: int | None = None  # argmax hits, when asked for (evaluation)


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(soft cap, scale) that some architectures apply to the head's output (Gemma 2, Cohere)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return cap, 1.0 if scale is None else float(scale)


def loss_from_hidden(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, config: Any,
                     chunk_size: int = DEFAULT_CHUNK, count_correct: bool = False
                     ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(summed loss, target tokens, argmax hits or None) from hidden states (batch, seq, d) and their
    aligned labels (batch, seq): the projection runs only at target positions."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    targets = labels[mask]
    selected = hidden[:, :-1][mask]  # (n, d)
    cap, scale = _logit_transform(config)
    correct = None
    if isinstance(head, torch.nn.Linear) and cap is None and scale == 1.0:
        loss = linear_cross_entropy_sum(selected, head.weight, head.bias, targets, chunk_size)
        if count_correct:
            with torch.no_grad():
                correct = sum((F.linear(selected[s : s + chunk_size], head.weight, head.bias).argmax(-1)
                               == targets[s : s + chunk_size]).sum() for s in range(0, targets.shape[0], chunk_size))
        return loss, int(targets.shape[0]), correct
    # any other head (LoRA on the head, soft-capped or scaled logits): logits at the target positions only
    logits = head(selected).float() * scale  # (n, vocab)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if count_correct:
        correct = (logits.argmax(-1) == targets).sum()
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.shape[0]), correct


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK,
                   count_correct: bool = False) -> LossOutput:
    """Summed next-token loss over the batch's target tokens (labels != -100, shifted by one).

    `model` is a `TrainModel` (possibly wrapped by DDP or FSDP, whose forward computes the loss) or a
    plain transformers causal LM, which is wrapped as one.
    """
    wrapped = isinstance(model, TrainModel) or isinstance(getattr(model, "module", None), TrainModel)  # DDP
    tm = model if wrapped else TrainModel(model, "full")
    loss, n, correct = tm(batch, chunk_size=chunk_size, count_correct=count_correct)
    return LossOutput(loss, n, int(correct) if correct is not None else None)
