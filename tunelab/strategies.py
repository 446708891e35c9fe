"""The table of tuning strategies: for each, which parameters train and which are added."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.config import StrategyConfig


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.4g}%)"


def count_parameters(model: torch.nn.Module) -> ParamCount:
    params = list(model.parameters())  # shared (tied) tensors appear once
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def apply_strategy(model: Any, cfg: StrategyConfig) -> Any:
    """Set what trains. `full`: every weight of the LM (promptless fine-tuning)."""
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    raise AssertionError(f"unhandled strategy {cfg.name}")
