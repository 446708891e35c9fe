"""AdamW (torch's, or bitsandbytes' 8-bit and paged 8-bit) or plain SGD with the usual decay groups, and the
warmup + cosine / linear / constant schedule."""

from __future__ import annotations

import math

import torch

from tunelab.config import BITSANDBYTES_OPTIMIZERS, TrainConfig
from tunelab.errors import ConfigError


def check_optimizer(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before anything is written, an optimizer this device cannot run as asked: a paged optimizer pages
    its states between GPU and host memory through CUDA unified memory, which the CPU has no counterpart of
    (bitsandbytes would quietly run it unpaged)."""
    if cfg.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(f"train.optimizer is paged_adamw_8bit, but this run trains on the {device.type}: paging "
                          "moves optimizer states between GPU memory and the host through CUDA unified memory, so it "
                          "needs a CUDA GPU. Use train.optimizer: adamw_8bit (the same 8-bit states, unpaged) or "
                          "adamw on the CPU.")


def _bitsandbytes_adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-wise moments (paged: in CUDA unified memory)."""
    from tunelab.models.quantize import import_bitsandbytes

    bnb = import_bitsandbytes()
    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable parameters; biases and norm weights (1-d) get no weight decay.

    AdamW by default; adamw_8bit and paged_adamw_8bit are bitsandbytes' (the same update, its moments stored
    as 8-bit codes with a scale per block of 256). SGD is plain gradient descent (no momentum; its weight
    decay, added to the gradient, is AdamW's decoupled decay for plain SGD): its update is proportional to the
    gradient, so it shows a wrong gradient scale that Adam's per-parameter normalisation hides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no parameter is trainable, so there is nothing to optimize")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.learning_rate)
    if cfg.optimizer in BITSANDBYTES_OPTIMIZERS:
        return _bitsandbytes_adamw([g for g in groups if g["params"]], cfg)
    # fused: one kernel over all parameters (on the CPU too since torch 2.4): on SmolLM2's 134M parameters a step
    # of 0.085 s against the default multi-tensor path's 0.38 s, two threads (BENCHMARKS.md)
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else device.type in ("cuda", "cpu")
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
