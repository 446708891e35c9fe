"""The taxonomy of adapting a pretrained LM (Liu et al. 2021, "Pre-train, Prompt, and Predict", 7.2)
plus the parameter-efficient family: for each strategy, what trains and what is added.
"""

from __future__ import annotations

import fnmatch
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.config import StrategyConfig
from tunelab.errors import ConfigError, ModelError
from tunelab.strategies.model import TrainModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strategy:
    lm: str  # what happens to the LM's own parameters
    prompt: str
    trains: str


STRATEGIES: dict[str, Strategy] = {
    "prompting": Strategy("frozen", "discrete template, zero- or few-shot", "nothing: it evaluates only"),
    "full": Strategy("all tuned", "none (optional template)", "all weights"),
    "fixed_prompt": Strategy("tuned (all, or LoRA)", "a fixed discrete template", "weights (or LoRA)"),
    "soft_prompt": Strategy("frozen", "learned continuous prompt", "prompt parameters only"),
    "prompt_lm": Strategy("tuned", "learned continuous prompt", "prompt parameters and all weights"),
    "lora": Strategy("frozen, plus low-rank adapters", "optional template", "adapters"),
    "freeze": Strategy("top-k layers or named modules tuned", "optional template", "the chosen modules"),
}


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _lora(model: Any, cfg: StrategyConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    s = cfg.lora
    targets = s.target_modules
    if targets != "all-linear":
        present = _linear_module_names(model)
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"strategy.lora.target_modules names {missing}, which match no linear module of this "
                              f"model. Its linear modules are: {', '.join(present)} (or use all-linear).")
    peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                          target_modules=targets, use_dora=s.variant == "dora", use_rslora=s.variant == "rslora")
    return get_peft_model(model, peft_cfg)


def _init_token_ids(tokenizer: Any, text: str | None, n: int, seed: int) -> list[int]:
    """Token ids whose embeddings initialise a soft prompt: the text (repeated to length n) or sampled vocabulary."""
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("strategy.soft_prompt.init_text tokenizes to nothing; give a non-empty text")
        return (ids * (n // len(ids) + 1))[:n]
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return random.Random(seed).sample(vocab, n) if len(vocab) >= n else random.Random(seed).choices(vocab, k=n)


@torch.no_grad()
def _prefix_from_activations(model: Any, token_ids: list[int]) -> torch.Tensor:
    """Prefix keys and values taken from the model's own activations on real tokens (Li and Liang 2021, 5.3),
    laid out as peft's prefix embedding: (virtual_tokens, layers * 2 * kv_heads * head_dim)."""
    out = model(input_ids=torch.tensor([token_ids], device=model.device), use_cache=True)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    rows = []
    for layer in cache.layers:
        for kv in (layer.keys, layer.values):  # (1, kv_heads, tokens, head_dim)
            rows.append(kv[0].permute(1, 0, 2).reshape(len(token_ids), -1))
    return torch.cat(rows, dim=1)


def _soft_prompt(model: Any, cfg: StrategyConfig, tokenizer: Any, seed: int) -> tuple[Any, int, bool]:
    from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit,
                      get_peft_model)

    s = cfg.soft_prompt
    n = s.num_virtual_tokens
    init_ids = _init_token_ids(tokenizer, s.init_text, n, seed)
    if s.method == "prompt_tuning":
        peft_cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.RANDOM)
    elif s.method == "p_tuning":
        peft_cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                       encoder_hidden_size=s.encoder_hidden_size or model.config.hidden_size)
    else:
        peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=s.prefix_projection)
    prefix_init = _prefix_from_activations(model, init_ids) if s.method == "prefix_tuning" else None
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ModelError(f"peft cannot apply {s.method} to a '{model.config.model_type}' model: {exc}. Try "
                         "strategy.soft_prompt.method: prompt_tuning, or strategy.name: lora.") from None
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    with torch.no_grad():
        if s.method in ("prompt_tuning", "p_tuning"):  # the (encoder's input) embeddings of real tokens
            table = model.get_input_embeddings().weight
            encoder.embedding.weight.copy_(table[torch.tensor(init_ids, device=table.device)])
        elif not s.prefix_projection:
            encoder.embedding.weight.copy_(prefix_init)
    return peft_model, (0 if s.method == "prefix_tuning" else n), s.method == "prefix_tuning"


def _freeze(model: Any, cfg: StrategyConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    s = cfg.freeze
    if s.trainable_layers:
        layers = model.get_decoder().layers
        if s.trainable_layers > len(layers):
            raise ConfigError(f"strategy.freeze.trainable_layers is {s.trainable_layers} but the model has "
                              f"{len(layers)} decoder layers.")
        for layer in list(layers)[-s.trainable_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return
    names = [n for n, _ in model.named_parameters()]
    for pattern in s.modules:
        hits = [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, pattern + ".*")]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            raise ConfigError(f"strategy.freeze.modules pattern '{pattern}' matches no parameter. The model's modules "
                              f"are, for example: {', '.join(modules[:12])} ...")
        for name, p in model.named_parameters():
            if name in hits:
                p.requires_grad_(True)


def prepare_strategy(model: Any, cfg: StrategyConfig, tokenizer: Any, seed: int = 0) -> TrainModel:
    """Set what trains and add what the strategy adds; the result is what the training loop runs."""
    name = cfg.name
    if name in ("full", "prompting") or (name == "fixed_prompt" and cfg.fixed_prompt.tune == "all"):
        for p in model.parameters():
            p.requires_grad_(name != "prompting")
        return TrainModel(model, name)
    if name == "freeze":
        _freeze(model, cfg)
        return TrainModel(model, name)
    if name in ("lora", "fixed_prompt"):
        return TrainModel(_lora(model, cfg), name)
    if name in ("soft_prompt", "prompt_lm"):
        peft_model, virtual, prefix = _soft_prompt(model, cfg, tokenizer, seed)
        if name == "prompt_lm":
            for p in peft_model.get_base_model().parameters():
                p.requires_grad_(True)
        return TrainModel(peft_model, name, virtual_tokens=virtual, prefix=prefix)
    raise AssertionError(f"unhandled strategy {name}")
