"""Preparing a model for its strategy: what trains in the base, and what is added, as its registry entry says."""

from __future__ import annotations

from typing import Any

from tunelab.models.quantize import is_quantized
from tunelab.strategies.build import choose_trainable
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import resolve


def prepare_quantized_base(model: Any) -> Any:
    """peft's k-bit preparation of a bitsandbytes-quantized base: every base weight frozen, the weights left in
    16 bits (norms, embeddings, the output head) upcast to float32 so that they compute at full precision.
    Activation checkpointing stays train.activation_checkpointing's decision (non-reentrant, it needs no input
    gradients)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def prepare_strategy(model: Any, cfg: Any, tokenizer: Any, seed: int = 0) -> TrainModel:
    """Set what trains and add what the strategy adds; the result is what the training loop runs. A quantized
    base (strategy.lora.quantize; the config refuses it for a strategy that trains base weights) is prepared
    for k-bit training first."""
    s = resolve(cfg)
    if is_quantized(model):
        assert s.quantizable_base, f"strategy {cfg.name} over a quantized base passed config validation"
        model = prepare_quantized_base(model)
    lm = s.addition.build(model, cfg, tokenizer, seed)  # the base frozen under the addition
    base = s.addition.base_of(lm)
    if s.base == "all":
        for p in base.parameters():
            p.requires_grad_(True)
    elif s.base == "chosen":
        choose_trainable(base, cfg.freeze)
    return TrainModel(lm, cfg.name, *s.addition.slots(lm))
