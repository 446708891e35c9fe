"""The output head: from the decoder's last hidden states to next-token scores at the target positions.

The training loss and the evaluation (label log-probabilities, the diff's KL) read the same positions
and apply the same head, so that what evaluation scores is what training optimised, and both equal
transformers' own forward: the labels shifted by one and masked, the output projection (lm_head, with
its bias where the architecture has one), the logit scale (Cohere's `logit_scale`) and the final soft
cap (Gemma 2's `final_logit_softcapping`). The projection is the module transformers itself calls
(`get_output_embeddings()`, LoRA layers on it included), and the scale and cap are read from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.encode import IGNORE
from tunelab.models.linear_cross_entropy import DEFAULT_CHUNK, liger_linear_cross_entropy_sum, linear_cross_entropy_sum


@dataclass(frozen=True)
class TargetPositions:
    """The positions of a batch whose next token is a target, in row-major order."""

    hidden: torch.Tensor  # (n, d): the hidden state that predicts each target
    targets: torch.Tensor  # (n,): the target token ids
    rows: torch.Tensor  # (n,): the batch row of each


def target_positions(hidden: torch.Tensor, labels: torch.Tensor) -> TargetPositions:
    """From hidden states (batch, seq, d) and their aligned labels (batch, seq): the hidden state at t
    predicts the label at t + 1, and only labels other than IGNORE are targets."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    return TargetPositions(hidden[:, :-1][mask], labels[mask], rows)


@dataclass(frozen=True)
class OutputHead:
    """The output projection and what the architecture applies to its logits."""

    projection: torch.nn.Module  # (n, d) -> (n, vocab)
    scale: float = 1.0  # logits are multiplied by it (Cohere's logit_scale)
    soft_cap: float | None = None  # logits become cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping)

    @classmethod
    def of(cls, model: Any) -> OutputHead:
        """The head of a transformers causal LM (the model itself, not a peft wrapper around it)."""
        config = model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        return cls(model.get_output_embeddings(), 1.0 if scale is None else float(scale),
                   getattr(config, "final_logit_softcapping", None))

    @property
    def is_plain_linear(self) -> bool:
        """A bare Linear with unchanged logits: the loss can fuse it with the cross-entropy."""
        return isinstance(self.projection, torch.nn.Linear) and self.scale == 1.0 and self.soft_cap is None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits (n, vocab) from hidden states (n, d)."""
        logits = self.projection(hidden).float() * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def cross_entropy_sum(self, at: TargetPositions, chunk_size: int = DEFAULT_CHUNK, count_correct: bool = False,
                          kernel: str = "chunked") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed cross-entropy over the targets, argmax hits or None). A plain Linear head runs fused with
        the cross-entropy, chunk by chunk (`kernel` chunked) or by liger-kernel (`kernel` liger); any other
        (LoRA on the head, scaled or soft-capped logits) computes the logits at the target positions only."""
        if not self.is_plain_linear:
            logits = self.logits(at.hidden)  # (n, vocab)
            correct = (logits.argmax(-1) == at.targets).sum() if count_correct else None
            return F.cross_entropy(logits, at.targets, reduction="sum"), correct
        weight, bias = self.projection.weight, self.projection.bias
        if kernel == "liger" and torch.is_grad_enabled():  # liger computes the weight's gradient in its forward
            loss = liger_linear_cross_entropy_sum(at.hidden, weight, bias, at.targets)
        else:
            loss = linear_cross_entropy_sum(at.hidden, weight, bias, at.targets, chunk_size)
        correct = None
        if count_correct:
            with torch.no_grad():
                correct = sum((F.linear(at.hidden[s : s + chunk_size], weight, bias).argmax(-1)
                               == at.targets[s : s + chunk_size]).sum() for s in range(0, at.targets.shape[0], chunk_size))
        return loss, correct
