"""Preparing a model for its strategy: what trains in the base, and what is added, as its registry entry says."""

from __future__ import annotations

from typing import Any

from tunelab.strategies.build import apply_soft_prompt, choose_trainable, get_peft_model_or_explain
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import resolve


def prepare_strategy(model: Any, cfg: Any, tokenizer: Any, seed: int = 0) -> TrainModel:
    """Set what trains and add what the strategy adds; the result is what the training loop runs."""
    s = resolve(cfg)
    virtual, prefix = 0, False
    if s.adds == "adapter":
        lm = get_peft_model_or_explain(model, s.adapter_config(model, cfg), s.name)
    elif s.adds == "soft_prompt":
        lm, virtual, prefix = apply_soft_prompt(model, cfg.soft_prompt, tokenizer, seed)
    else:
        lm = model
        for p in model.parameters():
            p.requires_grad_(False)
    base = lm.get_base_model() if s.adds != "nothing" else lm
    if s.base == "all":
        for p in base.parameters():
            p.requires_grad_(True)
    elif s.base == "chosen":
        choose_trainable(base, cfg.freeze)
    return TrainModel(lm, cfg.name, virtual_tokens=virtual, prefix=prefix)
