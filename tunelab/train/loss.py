"""The supervised fine-tuning loss: summed cross-entropy over target tokens only.

The model's forward computes it (so that DDP and FSDP see every parameter use), through the output
head of `tunelab.models.head`, which evaluation scores with too. The caller divides the sum by the
number of target tokens in the whole optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.models.linear_cross_entropy import DEFAULT_CHUNK
from tunelab.strategies.model import TrainModel


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over target tokens; divide by the step's target-token count
    num_label_tokens: int
    num_correct: int | None = None  # argmax hits, when asked for (evaluation)


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
