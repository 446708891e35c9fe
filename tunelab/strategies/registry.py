"""The strategy registry: one `TuningStrategy` per strategy, the one place a strategy is defined.

The taxonomy of adapting a pretrained LM (Liu et al. 2021, "Pre-train, Prompt, and Predict", 7.2) plus the
parameter-efficient family. Each entry says what trains in the base model, what is added (nothing, a peft
adapter, a soft prompt), how the result saves and merges, and how many parameters it adds (from the model's
shape, for the planner). Preparation (strategies/prepare.py), export, evaluation loading, the planner and the config read these fields;
no other module compares strategy names. Adding a strategy is adding an entry here.

A leaf: it imports no other tunelab module but errors, and torch and peft only inside functions (the config
validates strategy names against it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from tunelab.errors import ConfigError, ModelError

# a tunelab.config.StrategyConfig: the config imports this registry (to validate strategy names), not the reverse
StrategyConfig = Any

Base = Literal["none", "all", "chosen"]  # what trains in the base model: nothing, every weight, chosen modules
Adds = Literal["nothing", "adapter", "soft_prompt"]  # what the strategy adds to the base model


@dataclass(frozen=True)
class TuningStrategy:
    name: str
    lm: str  # what happens to the LM's own parameters (prose: plan and docs)
    prompt: str  # what prompt the model sees
    trains: str  # what trains
    base: Base
    adds: Adds
    peft_type: str | None = None  # for adds == "adapter": peft's type of the adapter (LORA, IA3)
    adapter_config: Callable[[Any, StrategyConfig], Any] | None = None  # (model, cfg) -> a peft config
    count_adapter: Callable[[Any, StrategyConfig], int] | None = None  # (model shape, cfg) -> adapter parameters
    mergeable: bool = False  # `tunelab export --merge` folds the addition into the weights
    requires_template: bool = False
    planned: bool = True  # estimated by `tunelab plan` unless strategies are named
    learning_rates: str = "n/a"  # the usual learning-rate range, as the advisor recommends it
    refine: Callable[[StrategyConfig], TuningStrategy] | None = None  # a strategy whose settings pick its form

    @property
    def trains_anything(self) -> bool:
        return self.base != "none" or self.adds != "nothing"

    @property
    def trains_base_weights(self) -> bool:
        """Every base weight (the output head included) trains."""
        return self.base == "all"

    @property
    def keeps_base_weights(self) -> bool:
        """The base model's own weights are unchanged: without the addition, the model is exactly the base."""
        return self.base == "none"

    @property
    def cost_class(self) -> str:
        """'weights', 'adapter' or 'frozen': the class of the strategy for memory and time estimates."""
        if self.base != "none":
            return "weights"
        return "adapter" if self.adds == "adapter" else "frozen"

    @property
    def saves(self) -> str:
        """What final/ holds: nothing, a Hugging Face model, a peft adapter, or both (model/ base + adapter/)."""
        if not self.trains_anything:
            return "nothing"
        if self.adds == "nothing":
            return "model"
        return "model+adapter" if self.base != "none" else "adapter"


# -- adapters (peft configs) and their parameter counts from the model's shape ----------------------------------

def _linear_module_names(model: Any) -> list[str]:
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def _lora_config(model: Any, cfg: StrategyConfig) -> Any:
    from peft import LoraConfig

    s = cfg.lora
    targets = s.target_modules
    if targets != "all-linear":
        present = _linear_module_names(model)
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"strategy.lora.target_modules names {missing}, which match no linear module of this "
                              f"model. Its linear modules are: {', '.join(present)} (or use all-linear).")
    return LoraConfig(task_type="CAUSAL_LM", r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                      target_modules=targets, use_dora=s.variant == "dora", use_rslora=s.variant == "rslora")


def _targets(shape: Any, suffixes: list[str] | str) -> list[tuple[str, int, int]]:
    """The shape's linear layers (name, in, out) whose last name part is one of `suffixes` (or all of them)."""
    if suffixes == "all-linear":
        return shape.linears
    return [(n, i, o) for n, i, o in shape.linears if n.rsplit(".", 1)[-1] in suffixes]


def _count_lora(shape: Any, cfg: StrategyConfig) -> int:
    s = cfg.lora
    return sum(s.rank * (i + o) + (o if s.variant == "dora" else 0) for _, i, o in _targets(shape, s.target_modules))


def _ia3_modules(model_type: str) -> tuple[list[str], list[str]]:
    """peft's default (IA)^3 targets for a model family: (target modules, the feed-forward ones among them)."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    if model_type not in TARGETS:
        raise ModelError(f"peft has no (IA)^3 targets for '{model_type}' models (it knows {', '.join(sorted(TARGETS))})."
                         " Use strategy.name: lora, whose strategy.lora.target_modules can name any linear layer.")
    return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))


def _ia3_config(model: Any, cfg: StrategyConfig) -> Any:
    from peft import IA3Config

    targets, feedforward = _ia3_modules(model.config.model_type)
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)


def _count_ia3(shape: Any, cfg: StrategyConfig) -> int:
    """One learned scale per feature: the input of a feed-forward target, the output of the others (peft's IA3Layer)."""
    targets, feedforward = _ia3_modules(shape.model_type)
    return sum(i if n.rsplit(".", 1)[-1] in feedforward else o for n, i, o in _targets(shape, targets))


def _fixed_prompt(cfg: StrategyConfig) -> TuningStrategy:
    """fixed_prompt tunes all weights (tune: all) or LoRA adapters (tune: lora) under its template."""
    if cfg.fixed_prompt.tune == "all":
        return replace(STRATEGIES["full"], name="fixed_prompt")
    return replace(STRATEGIES["lora"], name="fixed_prompt")


STRATEGIES: dict[str, TuningStrategy] = {s.name: s for s in [
    TuningStrategy("prompting", "frozen", "discrete template, zero- or few-shot", "nothing: it evaluates only",
                   base="none", adds="nothing"),
    TuningStrategy("soft_prompt", "frozen", "learned continuous prompt (prompt tuning, P-tuning, prefix tuning)",
                   "prompt parameters only", base="none", adds="soft_prompt", learning_rates="1e-3 to 3e-2"),
    TuningStrategy("lora", "frozen, plus low-rank adapters", "optional template", "adapters", base="none",
                   adds="adapter", peft_type="LORA", adapter_config=_lora_config, count_adapter=_count_lora,
                   mergeable=True, learning_rates="1e-4 to 1e-3"),
    TuningStrategy("ia3", "frozen, plus learned scales of keys, values and feed-forward inputs ((IA)^3)",
                   "optional template", "one scale per feature of the targeted layers", base="none", adds="adapter",
                   peft_type="IA3", adapter_config=_ia3_config, count_adapter=_count_ia3, mergeable=True,
                   learning_rates="3e-3 to 1e-2"),
    TuningStrategy("freeze", "top-k layers or named modules tuned", "optional template", "the chosen modules",
                   base="chosen", adds="nothing", learning_rates="1e-5 to 5e-5 (larger for tiny models)"),
    TuningStrategy("full", "all tuned", "none (optional template)", "all weights", base="all", adds="nothing",
                   learning_rates="1e-5 to 5e-5 (larger for tiny models)"),
    TuningStrategy("prompt_lm", "tuned", "learned continuous prompt", "prompt parameters and all weights",
                   base="all", adds="soft_prompt", learning_rates="1e-5 to 5e-5 (prompt: 1e-3)"),
    TuningStrategy("fixed_prompt", "tuned (all, or LoRA)", "a fixed discrete template", "weights (or LoRA)",
                   base="all", adds="nothing", requires_template=True, planned=False, refine=_fixed_prompt,
                   learning_rates="1e-5 to 5e-5 (tune: all); 1e-4 to 1e-3 (tune: lora)"),
]}


def resolve(cfg: StrategyConfig) -> TuningStrategy:
    """The strategy a config asks for, in the form its settings pick."""
    strategy = STRATEGIES[cfg.name]
    return strategy.refine(cfg) if strategy.refine else strategy


def planned_strategies() -> list[str]:
    return [name for name, s in STRATEGIES.items() if s.planned]


def mergeable_peft_types() -> set[str]:
    return {s.peft_type for s in STRATEGIES.values() if s.mergeable and s.peft_type}


# -- counting what a strategy will train, from the model's shape ---------------------------------------------------

def prompt_params(shape: Any, cfg: StrategyConfig) -> int:
    """Parameters a soft prompt adds (peft's PromptEmbedding, PromptEncoder MLP, PrefixEncoder)."""
    s, d = cfg.soft_prompt, shape.embedding_dim or shape.hidden  # prompts live where token embeddings do
    n = s.num_virtual_tokens
    if s.method == "prompt_tuning":
        return n * d
    if s.method == "p_tuning":
        h = s.encoder_hidden_size or shape.hidden
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    kv = shape.layers * 2 * shape.kv_dim
    if s.prefix_projection:
        t = shape.kv_dim  # peft's token_dim for a prefix is the key/value width; its MLP is that wide too
        return n * t + (t * t + t) + (t * kv + kv)
    return n * kv


def parameter_counts(shape: Any, cfg: StrategyConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the model as the strategy prepares it, from the model's shape
    (plan.estimate.ModelShape: total_params, layer_params, param_names, linears, hidden, layers, kv_dim)."""
    s, total = resolve(cfg), shape.total_params
    added = 0
    if s.adds == "adapter":
        added = s.count_adapter(shape, cfg)
    elif s.adds == "soft_prompt":
        added = prompt_params(shape, cfg)
    if s.base == "all":
        base = total
    elif s.base == "chosen" and cfg.freeze.trainable_layers:
        base = sum(shape.layer_params[-cfg.freeze.trainable_layers :])
    elif s.base == "chosen":
        hit = {n for n in shape.param_names for pat in cfg.freeze.modules
               if fnmatch.fnmatch(n, pat) or fnmatch.fnmatch(n, pat + ".*")}
        base = sum(shape.param_names[n] for n in hit)
    else:
        base = 0
    return base + added, total + added
