"""Preparing a model for its strategy: what trains in the base, and what is added, as its registry entry says."""

from __future__ import annotations

from typing import Any

from tunelab.strategies.build import choose_trainable
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import resolve


def prepare_strategy(model: Any, cfg: Any, tokenizer: Any, seed: int = 0) -> TrainModel:
    """Set what trains and add what the strategy adds; the result is what the training loop runs."""
    s = resolve(cfg)
    lm = s.addition.build(model, cfg, tokenizer, seed)  # the base frozen under the addition
    base = s.addition.base_of(lm)
    if s.base == "all":
        for p in base.parameters():
            p.requires_grad_(True)
    elif s.base == "chosen":
        choose_trainable(base, cfg.freeze)
    return TrainModel(lm, cfg.name, *s.addition.slots(lm))
