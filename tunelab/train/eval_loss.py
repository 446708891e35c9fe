"""Held-out loss and token accuracy during training, token-normalised over the whole eval set."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.data.batching import eval_batches
from tunelab.data.encode import Encoded
from tunelab.train.distributed import reshard
from tunelab.train.loss import causal_lm_loss


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[Encoded], batch_size: int, pad_id: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None, virtual_tokens: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    for batch in eval_batches(examples, batch_size, pad_id, virtual_tokens):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            out = causal_lm_loss(model, batch, count_correct=True)
        loss_sum += float(out.loss_sum)
        n_tokens += out.num_label_tokens
        n_correct += out.num_correct or 0
    reshard(model)  # no backward follows: FSDP2's root would stay gathered
    model.train(was_training)
    loss = loss_sum / max(1, n_tokens)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": n_correct / max(1, n_tokens), "eval_num_label_tokens": n_tokens}
