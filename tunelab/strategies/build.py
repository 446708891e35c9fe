"""What trains in the base model when a strategy chooses (strategy.freeze): the top k decoder layers, or the
parameters that name patterns match. What a strategy adds (an adapter, a soft prompt) is built by its `Addition`
in the registry (tunelab/strategies/registry.py)."""

from __future__ import annotations

from typing import Any

from tunelab.errors import ConfigError
from tunelab.models.layers import decoder_layers
from tunelab.strategies.registry import matches_freeze_pattern

# tunelab.config's strategy.freeze section (the config imports the registry: not the reverse)
FreezeSettings = Any


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
        hits = [n for n in names if matches_freeze_pattern(n, pattern)]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            raise ConfigError(f"strategy.freeze.modules pattern '{pattern}' matches no parameter. The model's modules "
                              f"are, for example: {', '.join(modules[:12])} ...")
        for name, p in model.named_parameters():
            if name in hits:
                p.requires_grad_(True)
