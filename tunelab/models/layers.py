"""The decoder's blocks, wherever an architecture keeps them: `model.layers` (Llama, Qwen, Mistral, Gemma),
`transformer.h` (GPT-2, GPT-J, Bloom, Falcon), `decoder.layers` (OPT), `gpt_neox.layers` (GPT-NeoX)."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.errors import ModelError


def num_layers(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks: the outermost ModuleList of the decoder (transformers' `get_decoder()`) as long
    as the config's number of layers."""
    n = num_layers(model.config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for root in (decoder, model):
        for module in root.modules():  # outermost first
            if isinstance(module, torch.nn.ModuleList) and len(module) == n:
                return module
    raise ModelError(f"cannot find the {n} decoder layers of this '{model.config.model_type}' model (no list of "
                     "that many blocks). Use strategy.freeze.modules (parameter-name patterns) instead of "
                     "strategy.freeze.trainable_layers, or a strategy that needs no layer list.")
