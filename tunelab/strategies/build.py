"""How strategies change a model: peft adapters applied, soft prompts initialised from real tokens, chosen modules
unfrozen. The registry (tunelab/strategies/registry.py) decides which of these a strategy uses."""

from __future__ import annotations

import fnmatch
import random
from typing import Any

import torch

from tunelab.errors import ConfigError, ModelError
from tunelab.models.layers import decoder_layers

# tunelab.config's strategy.soft_prompt and strategy.freeze sections (the config imports the registry, which imports
# this module: not the reverse)
SoftPromptSettings = FreezeSettings = Any


def get_peft_model_or_explain(model: Any, peft_config: Any, strategy: str) -> Any:
    """peft's get_peft_model, with peft's refusal of an architecture turned into an error a user can act on."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ModelError(f"peft cannot apply strategy {strategy} to a '{model.config.model_type}' model: {exc}. "
                         "Try strategy.name: lora with strategy.lora.target_modules naming its linear layers.") from None


def _init_token_ids(tokenizer: Any, text: str | None, n: int, seed: int, num_embeddings: int) -> list[int]:
    """Token ids whose embeddings initialise a soft prompt: the text (repeated to length n) or sampled vocabulary
    (the tokenizer's ordinary tokens that have an embedding row; every non-special row where it has none)."""
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("strategy.soft_prompt.init_text tokenizes to nothing; give a non-empty text")
        return (ids * (n // len(ids) + 1))[:n]
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), num_embeddings)) if i not in special] or \
        [i for i in range(num_embeddings) if i not in special]
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


def apply_soft_prompt(model: Any, s: SoftPromptSettings, tokenizer: Any, seed: int) -> tuple[Any, int, bool]:
    """The model wrapped by peft with a soft prompt, its virtual-token slots per example, and whether it is a prefix
    (whose keys and values peft's own forward supplies)."""
    from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit,
                      get_peft_model)

    n = s.num_virtual_tokens
    embeddings = model.get_input_embeddings()
    init_ids = _init_token_ids(tokenizer, s.init_text, n, seed, embeddings.num_embeddings)
    width = embeddings.embedding_dim  # the prompt lives where token embeddings do (OPT-350m's are narrower than hidden)
    if s.method == "prompt_tuning":
        peft_cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=width,
                                      prompt_tuning_init=PromptTuningInit.RANDOM)
    elif s.method == "p_tuning":
        peft_cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=width,
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
        if s.method in ("prompt_tuning", "p_tuning"):  # the (encoder's input) embeddings of real tokens, as the
            # embedding module gives them: at their scale where it scales them (Gemma's sqrt(hidden))
            ids = torch.tensor(init_ids, device=embeddings.weight.device)
            encoder.embedding.weight.copy_(embeddings(ids).to(encoder.embedding.weight.dtype))
        elif not s.prefix_projection:
            encoder.embedding.weight.copy_(prefix_init)
    return peft_model, (0 if s.method == "prefix_tuning" else n), s.method == "prefix_tuning"


def choose_trainable(model: Any, s: FreezeSettings) -> None:
    """Only the chosen modules train: the top k decoder layers, or the parameters matching name patterns."""
    for p in model.parameters():
        p.requires_grad_(False)
    if s.trainable_layers:
        layers = decoder_layers(model)
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
