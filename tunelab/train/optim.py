"""AdamW (or plain SGD) with the usual decay groups, and the warmup + cosine / linear / constant schedule."""

from __future__ import annotations

import math

import torch

from tunelab.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable parameters; biases and norm weights (1-d) get no weight decay.

    AdamW by default. SGD is plain gradient descent (no momentum; its weight decay, added to the gradient, is
    AdamW's decoupled decay for plain SGD): its update is proportional to the gradient, so it shows a wrong
    gradient scale that Adam's per-parameter normalisation hides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no parameter is trainable, so there is nothing to optimize")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.learning_rate)
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=cfg.adam_betas,
                             eps=cfg.adam_eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup_steps` (the first step already moves: (s+1)/(w+1)),
    then the schedule falls to `min_lr_ratio` at the last step.
    """
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / (w + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, total_steps - w - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
