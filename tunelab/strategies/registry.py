"""The strategy registry: one `TuningStrategy` per strategy, the one place a strategy is defined.

The taxonomy of adapting a pretrained LM (Liu et al. 2021, "Pre-train, Prompt, and Predict", 7.2) plus the
parameter-efficient family. Each entry says what trains in the base model, what is added (an `Addition`: nothing, a
peft adapter, a soft prompt), how the result saves and merges, and how many parameters it adds (from the model's
shape, for the planner). An `Addition` object holds everything its kind does: how it is built onto a model, counted,
found again in a loaded model and taken off. Preparation (strategies/prepare.py), export, evaluation loading, the
planner and the config read these fields and ask these objects; no other module compares strategy names (a test
scans for it). Adding a strategy is adding an entry here.

A leaf: it imports no other tunelab module but errors, and torch and peft only inside functions (the config
validates strategy names against it).
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from tunelab.errors import ConfigError, ModelError

# a tunelab.config.StrategyConfig: the config imports this registry (to validate strategy names), not the reverse
StrategyConfig = Any

Base = Literal["none", "all", "chosen"]  # what trains in the base model: nothing, every weight, chosen modules
Adds = Literal["nothing", "adapter", "soft_prompt"]  # what the strategy adds to the base model


def matches_freeze_pattern(name: str, pattern: str) -> bool:
    """A parameter name matches a strategy.freeze.modules pattern: the pattern itself, or a module the pattern names
    (its parameters, `pattern.*`)."""
    return fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, pattern + ".*")


class PromptSlots(NamedTuple):
    """Where a model's soft prompt enters (tunelab.strategies.model.TrainModel's arguments)."""

    virtual_tokens: int = 0  # embedding slots reserved before each example (prompt tuning, P-tuning)
    prefix: bool = False  # keys and values in the KV cache, which peft's forward supplies (prefix tuning)


def _peft_type(lm: Any) -> str | None:
    """peft's type of the addition a (loaded or built) model carries; None without a peft config."""
    if not hasattr(lm, "peft_config"):
        return None
    cfg = lm.peft_config[lm.active_adapter]
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def _wrap_with_peft(model: Any, peft_config: Any, what: str, instead: str) -> Any:
    """peft's get_peft_model, with peft's refusal of an architecture turned into an error a user can act on."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise ModelError(f"peft cannot apply {what} to a '{model.config.model_type}' model: {exc}. {instead}") from None


# -- what a kind of addition does ---------------------------------------------------------------------------------

class Addition:
    """Nothing added: the model is the base model (the base's own weights, as the strategy's `base` says, train).
    The subclasses are the other kinds; each method is what that kind does."""

    kind: Adds = "nothing"
    detachable = False  # it comes off, leaving exactly the base model's behaviour
    mergeable = False  # `tunelab export --merge` folds it into the weights
    peft_type: str | None = None  # an adapter's peft type (LORA, IA3)

    def peft_types(self) -> set[str]:
        """peft's types this addition saves as (what an adapter_config.json of it says)."""
        return set()

    def build(self, model: Any, cfg: StrategyConfig, tokenizer: Any, seed: int) -> Any:
        """The model with the addition, every base weight frozen (prepare_strategy then unfreezes what `base` says)."""
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def base_of(self, lm: Any) -> Any:
        """The transformers model under the addition."""
        return lm

    def count(self, shape: Any, cfg: StrategyConfig) -> int:
        """Parameters the addition adds, from the model's shape (plan.estimate.ModelShape)."""
        return 0

    def slots(self, lm: Any) -> PromptSlots:
        """Where the addition's prompt enters the model it was built onto or loaded into (no prompt: nowhere)."""
        return PromptSlots()

    def activation_checkpointing_refusal(self, cfg: StrategyConfig) -> str | None:
        """Why the addition cannot train under activation checkpointing (None: it can)."""
        return None

    def save(self, lm: Any, tokenizer: Any, out: Any, base_path: str) -> None:
        """The addition alone, as its own folder whose config points at the base model `base_path`."""
        raise ValueError("nothing was added to this model: there is no addition to save apart from it")

    def detached(self, lm: Any) -> AbstractContextManager[Any]:
        """A context in which `lm` runs without the addition: the base model's own behaviour."""
        raise ValueError("nothing was added to this model: there is no adaptation to take off")


class _PeftAddition(Addition):
    """An addition peft builds, saves (adapter_config.json + adapter_model.safetensors) and takes off; as itself,
    a loaded peft adapter of a type no strategy adds."""

    kind: Adds = "adapter"
    detachable = True

    def base_of(self, lm: Any) -> Any:
        return lm.get_base_model()

    def save(self, lm: Any, tokenizer: Any, out: Any, base_path: str) -> None:
        """peft's adapter folder (adapter_config.json, adapter_model.safetensors) with the tokenizer beside it."""
        lm.peft_config[lm.active_adapter].base_model_name_or_path = base_path
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)

    def detached(self, lm: Any) -> AbstractContextManager[Any]:
        return lm.disable_adapter()  # peft's: adapter layers bypassed, a soft prompt not inserted


@dataclass(frozen=True, kw_only=True)
class Adapter(_PeftAddition):
    """A peft adapter over the frozen base: LoRA, (IA)^3."""

    peft_type: str  # type: ignore[assignment]  # peft's type of the adapter (LORA, IA3)
    peft_config: Callable[[Any, StrategyConfig], Any]  # (model, cfg) -> a peft config
    counter: Callable[[Any, StrategyConfig], int]  # (model shape, cfg) -> the adapter's parameters
    mergeable: bool = False
    after_wrap: Callable[[Any], Any] | None = None  # applied to the peft model once built (LoRA's lean dropout)

    def peft_types(self) -> set[str]:
        return {self.peft_type}

    def build(self, model: Any, cfg: StrategyConfig, tokenizer: Any, seed: int) -> Any:
        wrapped = _wrap_with_peft(model, self.peft_config(model, cfg), f"strategy {cfg.name}",
                                  "Try strategy.name: lora with strategy.lora.target_modules naming its linear layers.")
        if self.after_wrap is not None:
            self.after_wrap(wrapped)
        return wrapped

    def count(self, shape: Any, cfg: StrategyConfig) -> int:
        return self.counter(shape, cfg)


# -- soft prompts: the methods, how each is configured, counted and initialised --------------------------------------

def _prompt_tuning_config(s: Any, width: int, hidden: int) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.num_virtual_tokens, token_dim=width,
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def _p_tuning_config(s: Any, width: int, hidden: int) -> Any:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.num_virtual_tokens, token_dim=width,
                               encoder_hidden_size=s.encoder_hidden_size or hidden)


def _prefix_tuning_config(s: Any, width: int, hidden: int) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.num_virtual_tokens,
                              prefix_projection=s.prefix_projection)


def _count_prompt_tuning(shape: Any, s: Any, d: int) -> int:
    return s.num_virtual_tokens * d  # peft's PromptEmbedding


def _count_p_tuning(shape: Any, s: Any, d: int) -> int:
    h = s.encoder_hidden_size or shape.hidden  # peft's PromptEncoder: embeddings and a two-layer MLP
    return s.num_virtual_tokens * d + (d * h + h) + (h * h + h) + (h * d + d)


def _count_prefix_tuning(shape: Any, s: Any, d: int) -> int:
    n, kv = s.num_virtual_tokens, shape.layers * 2 * shape.kv_dim  # peft's PrefixEncoder
    if s.prefix_projection:
        t = shape.kv_dim  # peft's token_dim for a prefix is the key/value width; its MLP is that wide too
        return n * t + (t * t + t) + (t * kv + kv)
    return n * kv


@dataclass(frozen=True)
class SoftPromptMethod:
    """One way of learning a continuous prompt (strategy.soft_prompt.method)."""

    name: str
    peft_type: str  # what peft's adapter_config.json says
    in_slots: bool  # its vectors sit in virtual-token slots before each example; else keys and values of a prefix
    peft_config: Callable[[Any, int, int], Any]  # (settings, embedding width, hidden size) -> peft's config
    count: Callable[[Any, Any, int], int]  # (model shape, settings, embedding width) -> parameters


SOFT_PROMPT_METHODS: dict[str, SoftPromptMethod] = {m.name: m for m in [  # the config's choices, in this order
    SoftPromptMethod("prompt_tuning", "PROMPT_TUNING", True, _prompt_tuning_config, _count_prompt_tuning),
    SoftPromptMethod("prefix_tuning", "PREFIX_TUNING", False, _prefix_tuning_config, _count_prefix_tuning),
    SoftPromptMethod("p_tuning", "P_TUNING", True, _p_tuning_config, _count_p_tuning),
]}


def loaded_slots(lm: Any) -> PromptSlots:
    """Where the soft prompt of a built or loaded model enters, from its peft config (no soft prompt: nowhere)."""
    method = next((m for m in SOFT_PROMPT_METHODS.values() if m.peft_type == _peft_type(lm)), None)
    if method is None:
        return PromptSlots()
    if not method.in_slots:
        return PromptSlots(prefix=True)
    return PromptSlots(lm.peft_config[lm.active_adapter].num_virtual_tokens)


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


def _prefix_from_activations(model: Any, token_ids: list[int]) -> Any:
    """Prefix keys and values taken from the model's own activations on real tokens (Li and Liang 2021, 5.3),
    laid out as peft's prefix embedding: (virtual_tokens, layers * 2 * kv_heads * head_dim)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids], device=model.device), use_cache=True)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        rows = []
        for layer in cache.layers:
            for kv in (layer.keys, layer.values):  # (1, kv_heads, tokens, head_dim)
                rows.append(kv[0].permute(1, 0, 2).reshape(len(token_ids), -1))
        return torch.cat(rows, dim=1)


class SoftPrompt(_PeftAddition):
    """A learned continuous prompt (prompt tuning, P-tuning, prefix tuning), initialised from real tokens."""

    kind: Adds = "soft_prompt"

    def peft_types(self) -> set[str]:
        return {m.peft_type for m in SOFT_PROMPT_METHODS.values()}

    def slots(self, lm: Any) -> PromptSlots:
        return loaded_slots(lm)

    def build(self, model: Any, cfg: StrategyConfig, tokenizer: Any, seed: int) -> Any:
        """peft's soft prompt on the model, its vectors the embeddings of real tokens (of a prefix: the keys and values
        the model computes for them) at the scale the embedding module gives them (Gemma's sqrt(hidden))."""
        import torch

        s = cfg.soft_prompt
        method = SOFT_PROMPT_METHODS[s.method]
        embeddings = model.get_input_embeddings()
        init_ids = _init_token_ids(tokenizer, s.init_text, s.num_virtual_tokens, seed, embeddings.num_embeddings)
        prefix_init = None if method.in_slots else _prefix_from_activations(model, init_ids)
        # the prompt lives where token embeddings do (OPT-350m's are narrower than hidden)
        peft_config = method.peft_config(s, embeddings.embedding_dim, model.config.hidden_size)
        peft_model = _wrap_with_peft(model, peft_config, s.method, "Try strategy.soft_prompt.method: prompt_tuning, "
                                     "or strategy.name: lora.")
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        with torch.no_grad():
            if method.in_slots:  # the (encoder's input) embeddings of real tokens
                ids = torch.tensor(init_ids, device=embeddings.weight.device)
                encoder.embedding.weight.copy_(embeddings(ids).to(encoder.embedding.weight.dtype))
            elif not s.prefix_projection:  # through an MLP, a prefix starts at random
                encoder.embedding.weight.copy_(prefix_init)
        return peft_model

    def count(self, shape: Any, cfg: StrategyConfig) -> int:
        s = cfg.soft_prompt  # prompts live where token embeddings do
        return SOFT_PROMPT_METHODS[s.method].count(shape, s, shape.embedding_dim or shape.hidden)

    def activation_checkpointing_refusal(self, cfg: StrategyConfig) -> str | None:
        if SOFT_PROMPT_METHODS[cfg.soft_prompt.method].in_slots:
            return None
        return ("prefix tuning's keys and values enter through the KV cache, which activation checkpointing's "
                "recomputation would extend a second time: turn train.activation_checkpointing off, or use "
                "strategy.soft_prompt.method: prompt_tuning")


NOTHING, SOFT_PROMPT, OTHER_PEFT = Addition(), SoftPrompt(), _PeftAddition()


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


def _lean_lora_dropout(model: Any) -> None:
    from tunelab.strategies.lora_dropout import lean_lora_dropout  # torch: imported when a model is built

    lean_lora_dropout(model)


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



# -- the strategies ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TuningStrategy:
    name: str
    lm: str  # what happens to the LM's own parameters (prose: plan and docs)
    prompt: str  # what prompt the model sees
    trains: str  # what trains
    base: Base
    addition: Addition  # what the strategy adds to the base model, and what that does
    requires_template: bool = False
    planned: bool = True  # estimated by `tunelab plan` unless strategies are named
    learning_rates: str = "n/a"  # the usual learning-rate range, as the advisor recommends it
    refine: Callable[[StrategyConfig], TuningStrategy] | None = None  # a strategy whose settings pick its form
    title: str | None = None  # the strategy's name in prose ("prompt+LM tuning"), where it is not `name`

    @property
    def adds(self) -> Adds:
        return self.addition.kind

    @property
    def peft_type(self) -> str | None:
        """For an adapter: peft's type of the adapter (LORA, IA3)."""
        return self.addition.peft_type

    @property
    def mergeable(self) -> bool:
        """`tunelab export --merge` folds the addition into the weights."""
        return self.addition.mergeable

    @property
    def prose_name(self) -> str:
        return self.title or self.name

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
    def detachable(self) -> bool:
        """The addition comes off and leaves exactly the base model (a base that trained cannot be gone back to)."""
        return self.keeps_base_weights and self.addition.detachable

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

    def settings_problem(self, cfg: StrategyConfig) -> str | None:
        """What the strategy's settings (strategy: section) lack for it to run (None: nothing)."""
        if self.requires_template and cfg.template is None:
            return f"strategy {self.name} tunes the LM under a fixed discrete prompt: set strategy.template"
        if self.base == "chosen" and len([k for k in ("trainable_layers", "modules") if getattr(cfg.freeze, k)]) != 1:
            return ("strategy freeze needs exactly one of strategy.freeze.trainable_layers (top k layers) and "
                    "strategy.freeze.modules (parameter-name patterns)")
        return None

    @property
    def quantizable_base(self) -> bool:
        """The base may be loaded quantized (strategy.lora.quantize): none of its own weights train, so its
        4-bit or 8-bit codes stay frozen and only what the strategy adds (kept in higher precision) learns."""
        return self.base == "none"

    def quantized_base_refusal(self, cfg: StrategyConfig) -> str | None:
        """Why strategy.lora.quantize cannot be set with this strategy's settings (None: it can, or it is unset)."""
        q = cfg.lora.quantize
        s = self.refine(cfg) if self.refine else self
        if q is not None and cfg.lora.quantize_embeddings and s.adds == "soft_prompt":
            return ("strategy.lora.quantize_embeddings stores the token embedding as 4-bit codes, but a soft prompt "
                    f"(strategy.name {self.name}) is built from and next to the embedding table in its float form. "
                    "Remove strategy.lora.quantize_embeddings (the decoder's layers stay 4-bit), or use lora, its "
                    "variants or ia3")
        if q is None or s.quantizable_base:
            return None
        bits = "8" if q == "int8" else "4"
        return (f"strategy.lora.quantize is {q}, but strategy.name {self.name} trains the base model's own weights, "
                f"and a {bits}-bit base is frozen integer codes with no gradient and no optimizer "
                "update (bitsandbytes' quantized layers cannot learn). Remove strategy.lora.quantize to train in 16/32 "
                "bits, or use a strategy that keeps the base frozen: lora (its dora and rslora variants), ia3 or "
                "soft_prompt" + (" (or strategy.fixed_prompt.tune: lora)" if self.refine else ""))

    def activation_checkpointing_refusal(self, cfg: StrategyConfig) -> str | None:
        """Why the strategy cannot train under activation checkpointing (None: it can)."""
        return self.addition.activation_checkpointing_refusal(cfg)


def _fixed_prompt(cfg: StrategyConfig) -> TuningStrategy:
    """fixed_prompt tunes all weights (tune: all) or LoRA adapters (tune: lora) under its template."""
    if cfg.fixed_prompt.tune == "all":
        return replace(STRATEGIES["full"], name="fixed_prompt")
    return replace(STRATEGIES["lora"], name="fixed_prompt")


LORA = Adapter(peft_type="LORA", peft_config=_lora_config, counter=_count_lora, mergeable=True,
               after_wrap=_lean_lora_dropout)
IA3 = Adapter(peft_type="IA3", peft_config=_ia3_config, counter=_count_ia3, mergeable=True)
STRATEGIES: dict[str, TuningStrategy] = {s.name: s for s in [
    TuningStrategy("prompting", "frozen", "discrete template, zero- or few-shot", "nothing: it evaluates only",
                   base="none", addition=NOTHING),
    TuningStrategy("soft_prompt", "frozen", "learned continuous prompt (prompt tuning, P-tuning, prefix tuning)",
                   "prompt parameters only", base="none", addition=SOFT_PROMPT, learning_rates="1e-3 to 3e-2"),
    TuningStrategy("lora", "frozen, plus low-rank adapters", "optional template", "adapters", base="none",
                   addition=LORA, learning_rates="1e-4 to 1e-3"),
    TuningStrategy("ia3", "frozen, plus learned scales of keys, values and feed-forward inputs ((IA)^3)",
                   "optional template", "one scale per feature of the targeted layers", base="none", addition=IA3,
                   learning_rates="3e-3 to 1e-2"),
    TuningStrategy("freeze", "top-k layers or named modules tuned", "optional template", "the chosen modules",
                   base="chosen", addition=NOTHING, learning_rates="1e-5 to 5e-5 (larger for tiny models)"),
    TuningStrategy("full", "all tuned", "none (optional template)", "all weights", base="all", addition=NOTHING,
                   learning_rates="1e-5 to 5e-5 (larger for tiny models)"),
    TuningStrategy("prompt_lm", "tuned", "learned continuous prompt", "prompt parameters and all weights",
                   base="all", addition=SOFT_PROMPT, learning_rates="1e-5 to 5e-5 (prompt: 1e-3)", title="prompt+LM"),
    TuningStrategy("fixed_prompt", "tuned (all, or LoRA)", "a fixed discrete template", "weights (or LoRA)",
                   base="all", addition=NOTHING, requires_template=True, planned=False, refine=_fixed_prompt,
                   learning_rates="1e-5 to 5e-5 (tune: all); 1e-4 to 1e-3 (tune: lora)"),
]}
ADDITIONS: tuple[Addition, ...] = (NOTHING, SOFT_PROMPT, LORA, IA3)


def resolve(cfg: StrategyConfig) -> TuningStrategy:
    """The strategy a config asks for, in the form its settings pick."""
    strategy = STRATEGIES[cfg.name]
    return strategy.refine(cfg) if strategy.refine else strategy


def planned_strategies() -> list[str]:
    return [name for name, s in STRATEGIES.items() if s.planned]


def mergeable_peft_types() -> set[str]:
    return {t for a in ADDITIONS if a.mergeable for t in a.peft_types()}


def addition_of_peft_type(peft_type: str | None) -> Addition:
    """The addition a saved or loaded peft folder of this type holds (no peft type: nothing)."""
    if peft_type is None:
        return NOTHING
    return next((a for a in ADDITIONS if peft_type in a.peft_types()), OTHER_PEFT)


def loaded_addition(lm: Any) -> Addition:
    """The addition a loaded model carries, from its peft config's type (no peft config: nothing)."""
    return addition_of_peft_type(_peft_type(lm))


# -- counting what a strategy will train, from the model's shape ---------------------------------------------------

def parameter_counts(shape: Any, cfg: StrategyConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the model as the strategy prepares it, from the model's shape
    (plan.estimate.ModelShape: total_params, layer_params, param_names, linears, hidden, layers, kv_dim)."""
    s, total = resolve(cfg), shape.total_params
    added = s.addition.count(shape, cfg)
    if s.base == "all":
        base = total
    elif s.base == "chosen" and cfg.freeze.trainable_layers:
        base = sum(shape.layer_params[-cfg.freeze.trainable_layers :])
    elif s.base == "chosen":
        hit = {n for n in shape.param_names for pat in cfg.freeze.modules if matches_freeze_pattern(n, pat)}
        base = sum(shape.param_names[n] for n in hit)
    else:
        base = 0
    return base + added, total + added
