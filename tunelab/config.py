"""The configuration tree: typed, loaded from YAML, overridable with `dotted.key=value`.

The whole tree is validated before any model or data is loaded. An unknown key is an error that
names the closest valid key; a wrong type names the key, the value and the expected type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError
from tunelab.strategies.registry import SOFT_PROMPT_METHODS, STRATEGIES, resolve


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # auto: sdpa on the CPU; on CUDA flash_attention_2 when flash-attn is installed, else sdpa
    attn_implementation: str = "auto"


class Template(_Section):
    """A discrete prompt: `prompt` and `target` are `str.format` strings over the record's fields."""

    prompt: str
    target: str = "{target}"
    instruction: str = ""  # text placed once before any demonstrations
    demo_separator: str = "\n\n"


RecordFormat = Literal["auto", "prompt_completion", "chat", "instruction", "text_label", "text", "tokenized"]


class DataSource(_Section):
    """One training file of a mixture: examples are drawn from it in proportion to its weight."""

    path: str
    weight: float = Field(default=1.0, gt=0.0)
    format: RecordFormat | None = None  # default: the data section's
    columns: dict[str, str] | None = None
    column_names: list[str] | None = None


class DataConfig(_Section):
    train: str | list[DataSource]  # one file, or a mixture of weighted files
    eval: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    format: RecordFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # canonical name -> the file's column
    column_names: list[str] | None = None  # names for the columns of a CSV/TSV without a header row
    max_length: int = Field(default=512, ge=2)
    # left: cut the prompt's start (then the target's end); right: cut the end; drop the example; error
    truncation: Literal["left", "right", "drop", "error"] = "left"
    render: Literal["auto", "template", "chat"] = "auto"
    chat_template: str | None = None  # a Jinja template that replaces the tokenizer's own
    last_turn_only: bool = False
    append_eos: bool = False  # chat: also train an EOS after each assistant turn where the template renders none
    # chat: the thinking mode a reasoning template (Qwen3) renders with, in training and in every generation from the
    # run: false closes an empty think block in the generation prompt; true leaves the think block to the model
    enable_thinking: bool = False
    max_examples: int | None = Field(default=None, ge=1)  # a seeded random sample of the training file
    max_eval_examples: int | None = Field(default=None, ge=1)  # a seeded random sample of the eval data
    cache: bool = True  # keep the encoded data on disk (Arrow), keyed by everything that changes it; --no-cache
    cache_dir: str | None = None  # default: ~/.cache/tunelab/encoded (XDG_CACHE_HOME)
    num_proc: int = Field(default=1, ge=1)  # processes that render and tokenize (datasets' map)
    streaming: bool = False  # read, encode and batch the training file as training goes (no encoded copy on disk)
    shuffle_buffer: int = Field(default=10_000, ge=1)  # streaming: records read, shuffled (and packed) at a time

    @field_validator("train")
    @classmethod
    def _some_source(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("data.train is an empty list: name a file, or a list of {path, weight} sources")
        return value

    def sources(self) -> list[DataSource]:
        """The training files, each with its reader settings (a single file is a mixture of one)."""
        if isinstance(self.train, str):
            return [DataSource(path=self.train, format=self.format, columns=self.columns,
                               column_names=self.column_names)]
        return [s.model_copy(update={"format": s.format or self.format,
                                     "columns": self.columns if s.columns is None else s.columns,
                                     "column_names": s.column_names or self.column_names}) for s in self.train]

    @property
    def train_path(self) -> str:
        """The training file (of a mixture, the first), for messages and the few-shot pool."""
        return self.train if isinstance(self.train, str) else self.train[0].path


class LoraSettings(_Section):
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module name suffixes, e.g. [q_proj, v_proj]
    variant: Literal["lora", "dora", "rslora"] = "lora"
    # the frozen base in 4-bit (nf4: QLoRA's NormalFloat; fp4) or 8-bit (int8: LLM.int8) through bitsandbytes, for
    # every strategy that keeps the base frozen (lora and its variants, ia3, soft prompts; tunelab/models/quantize.py)
    quantize: Literal["nf4", "fp4", "int8"] | None = None
    double_quant: bool = True  # 4-bit: the block scales quantized too (8-bit, about 0.37 bits per weight saved)
    # what a quantized layer dequantizes to and multiplies in; auto: bfloat16 on a GPU, float32 on the CPU
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 4-bit: the token embedding and output head stored in 4 bits too (a tied head shares the codes); QLoRA keeps
    # them in 16 bits, which in a small model with a large vocabulary is most of what is left of the base
    quantize_embeddings: bool = False


class SoftPromptSettings(_Section):
    method: Literal[tuple(SOFT_PROMPT_METHODS)] = "prompt_tuning"  # type: ignore[valid-type]  # the registry's
    num_virtual_tokens: int = Field(default=20, ge=1)
    init_text: str | None = None  # e.g. the task description; None: embeddings of sampled vocabulary tokens
    encoder_hidden_size: int | None = Field(default=None, ge=1)  # p_tuning's MLP width (default: the model's)
    prefix_projection: bool = False  # prefix_tuning through an MLP (then initialised at random)


class FreezeSettings(_Section):
    trainable_layers: int | None = Field(default=None, ge=1)  # the top k decoder layers train
    modules: list[str] | None = None  # or parameter-name patterns (fnmatch), e.g. ["model.layers.*.mlp.*"]


class FixedPromptSettings(_Section):
    tune: Literal["all", "lora"] = "all"  # with lora, strategy.lora sets the adapters


class StrategyConfig(_Section):
    name: Literal[tuple(STRATEGIES)] = "full"  # type: ignore[valid-type]  # the registry's names
    template: Template | None = None  # a plain string is taken as the template's `prompt`
    num_shots: int = Field(default=0, ge=0)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    soft_prompt: SoftPromptSettings = Field(default_factory=SoftPromptSettings)
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)
    fixed_prompt: FixedPromptSettings = Field(default_factory=FixedPromptSettings)

    @field_validator("template", mode="before")
    @classmethod
    def _template_from_string(cls, value: Any) -> Any:
        return {"prompt": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _complete(self) -> "StrategyConfig":
        problem = STRATEGIES[self.name].settings_problem(self)
        if problem:
            raise ValueError(problem)
        return self


BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")  # train.optimizer choices that bitsandbytes provides
BITSANDBYTES_NEEDED = ("bitsandbytes is not installed (pip install 'bitsandbytes>=0.50'); it is what loads a "
                       "quantized base and runs 8-bit optimizers, on the CPU too")


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported (strategy.lora.quantize and the 8-bit optimizers need it)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


class TrainConfig(_Section):
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0.0)
    learning_rate: float = Field(default=2e-5, gt=0.0)
    batch_size: int = Field(default=8, ge=1)  # examples per micro-batch (padded batching)
    grad_accum: int = Field(default=1, ge=1)
    # token-budget batching: examples packed into rows of data.max_length (best-fit-decreasing)
    tokens_per_step: int | None = Field(default=None, ge=1)
    tokens_per_micro_batch: int | None = Field(default=None, ge=1)  # default: tokens_per_step
    compile: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA, off on the CPU
    stop_after: int | None = Field(default=None, ge=1)  # stop at this step with a checkpoint (a time-sliced job)
    activation_checkpointing: bool = False
    # adamw; adamw_8bit: bitsandbytes' AdamW with 8-bit block-wise quantized moments (tensors under 4096 values keep
    # 32-bit ones); paged_adamw_8bit: the same in CUDA unified memory, paged out to the host under memory pressure
    # (CUDA only); sgd: plain gradient descent (no momentum, no state), whose update is proportional to the gradient
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    eval_every: int | None = Field(default=None, ge=1)
    save_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    fused_adamw: bool | None = None  # None: fused where the device supports it
    # the output projection fused with the loss: chunked (tunelab's, everywhere) or liger (liger-kernel's Triton
    # kernel: CUDA with the liger-kernel package installed)
    loss_kernel: Literal["chunked", "liger"] = "chunked"
    # on the CPU, floats below 1.2e-38 are flushed to zero: a trained model's backward makes such denormals, which
    # the CPU computes many times slower (stories260K soft prompt, GSM8K rows of 512: 0.273 s per step unflushed,
    # 0.248 s flushed, means of four runs); the random weights tunelab plan times make none. No effect on a GPU
    flush_denormals: bool = True
    progress: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []  # beside metrics.jsonl (train/trackers.py)
    # greedy predictions on the first num_samples eval prompts (train prompts without eval data) at step 0, every
    # sample_every steps and at the end: samples.jsonl, the trackers and the report (one process only)
    sample_every: int | None = Field(default=None, ge=1)
    num_samples: int = Field(default=4, ge=1)
    sample_tokens: int = Field(default=48, ge=1)
    # a NaN/inf loss or gradient norm: stop at once (nothing non-finite is saved), or skip that step's update (its
    # data is consumed, the schedule still advances) up to max_nonfinite_skips times in the run, then stop
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = Field(default=3, ge=1)



class EvalConfig(_Section):
    """`tunelab eval` (and the task part of diff and compare); the CLI's flags override these."""

    mode: Literal["auto", "generate", "score"] = "auto"  # auto: rank label options for label data, else generate
    metrics: list[str] | None = None  # default: chosen from the mode and the references
    max_new_tokens: int = Field(default=64, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop_strings: list[str] = []
    batch_size: int = Field(default=16, ge=1)  # sequences per forward call (bounds eval memory)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: a GPU when there is one
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 weights on a GPU that has it, else fp32
    max_examples: int | None = Field(default=None, ge=1)  # a seeded sample of the eval data
    seed: int = 0


class DiffConfig(_Section):
    """`tunelab diff` (and the forgetting part of compare); the CLI's flags override these."""

    reference_text: str | None = None  # a file of general text; default: samples of the base model itself
    probes: str | None = None  # JSONL of {prompt, answer}
    num_samples: int = Field(default=8, ge=1)  # base-model samples when there is no reference text
    sample_tokens: int = Field(default=128, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)  # of each probe and drift generation
    seed: int = 0


class DistributedConfig(_Section):
    strategy: Literal["fsdp2", "ddp"] = "fsdp2"  # used when launched with torchrun (or tunelab train --nproc N)


class PlanConfig(_Section):
    retention: Literal["low", "medium", "high"] = "medium"  # how much keeping general knowledge matters


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diff: DiffConfig = Field(default_factory=DiffConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: str
    resume: bool = False
    overwrite: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if STRATEGIES[self.strategy.name].trains_anything:  # tuning-free prompting trains nothing
            if self.train.max_steps is None and self.train.epochs is None:
                raise ValueError("set train.max_steps or train.epochs")
        if self.train.max_steps is not None and self.train.epochs is not None:
            raise ValueError("set only one of train.max_steps and train.epochs (both are set)")
        if self.data.eval is not None and self.data.eval_fraction is not None:
            raise ValueError("set only one of data.eval (a file) and data.eval_fraction (a split of data.train)")
        if self.train.eval_every is not None and self.data.eval is None and self.data.eval_fraction is None:
            raise ValueError("train.eval_every is set but there is no eval data: set data.eval or data.eval_fraction")
        if self.data.streaming:
            streamed = {"train.epochs": self.train.epochs is not None, "data.eval_fraction": self.data.eval_fraction
                        is not None, "data.max_examples": self.data.max_examples is not None,
                        "strategy.num_shots": self.strategy.num_shots > 0,
                        "a list in data.train": isinstance(self.data.train, list)}
            if any(streamed.values()):
                bad = next(k for k, v in streamed.items() if v)
                raise ValueError(f"data.streaming reads the training file once, in order, without knowing its size: "
                                 f"{bad} needs the whole file first. Use train.max_steps, data.eval and one file, "
                                 "or turn streaming off (the on-disk cache keeps memory flat too)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite are both set: choose one")
        if not bitsandbytes_installed():
            for key, value in (("strategy.lora.quantize", self.strategy.lora.quantize),
                               ("train.optimizer", self.train.optimizer if self.train.optimizer in
                                BITSANDBYTES_OPTIMIZERS else None)):
                if value is not None:
                    raise ValueError(f"{key} is {value}, but {BITSANDBYTES_NEEDED}. Install it, or remove {key}")
        lora = self.strategy.lora
        if lora.quantize_embeddings and lora.quantize not in ("nf4", "fp4"):
            raise ValueError(f"strategy.lora.quantize_embeddings stores the embeddings in 4 bits like the layers, but "
                             f"strategy.lora.quantize is {lora.quantize or 'not set'}: set it to nf4 (or fp4), or remove "
                             "strategy.lora.quantize_embeddings")
        refusal = STRATEGIES[self.strategy.name].quantized_base_refusal(self.strategy)
        if refusal:
            raise ValueError(refusal)
        refusal = resolve(self.strategy).activation_checkpointing_refusal(self.strategy)
        if self.train.activation_checkpointing and refusal:
            raise ValueError(refusal)
        t, n = self.train, self.data.max_length
        if t.tokens_per_micro_batch is not None and t.tokens_per_step is None:
            raise ValueError("train.tokens_per_micro_batch needs train.tokens_per_step")
        if t.tokens_per_step is not None:
            micro = t.tokens_per_micro_batch or t.tokens_per_step
            if micro < n:
                raise ValueError(f"train.tokens_per_micro_batch ({micro}) must be at least data.max_length ({n}): "
                                 "a micro-batch holds whole rows of data.max_length tokens")
            if t.tokens_per_step % micro:
                raise ValueError(f"train.tokens_per_step ({t.tokens_per_step}) must be a multiple of "
                                 f"train.tokens_per_micro_batch ({micro})")
        return self

    def for_strategy(self, name: str, overrides: Mapping[str, Any] | Iterable[str | tuple[str, Any]] = (),
                     source: str | None = None) -> Config:
        """This config under strategy `name` with `overrides` set over it in order (dotted.key -> value, or
        `dotted.key=value` texts as on the command line, or (dotted.key, value) pairs), validated as any config is:
        an unknown key names the closest valid one. The one way compare, plan and the step timer derive a strategy's
        config from the user's."""
        tree = self.model_dump(mode="json")
        tree["strategy"]["name"] = name
        pairs = overrides.items() if isinstance(overrides, Mapping) else \
            [parse_override(o) if isinstance(o, str) else o for o in overrides]
        for key, value in pairs:
            _set_dotted(tree, key, value)
        return validate_config(tree, source or f"the config for strategy {name}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str = "the config") -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or an empty section (`train:` with nothing under it is YAML null)
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' holds a value, not a section of "
                              f"keys ({source} sets it to {repr(child)[:60]}).")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is read as YAML so `50`, `1e-4`, `true` and `[q_proj]` get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value (e.g. train.max_steps=50).")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return key, raw


def _allowed_keys(section: type[BaseModel]) -> list[str]:
    return list(section.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    section: type[BaseModel] = Config
    for part in loc:
        field = section.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        section = nested[0]
    return section


def _explain(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent = _section_at(loc[:-1])
        valid = _allowed_keys(parent) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
        return f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}."
    if error["type"] == "missing":
        return f"config key '{key}' is required but missing."
    if not loc:
        return error["msg"].removeprefix("Value error, ")
    return f"config key '{key}' = {error.get('input')!r}: {error['msg'].removeprefix('Value error, ')}."


def validate_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Turn a plain dict into a `Config`, or raise one `ConfigError` listing every problem."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        seen: list[str] = []
        for err in exc.errors():
            msg = _explain(err)
            if msg not in seen:
                seen.append(msg)
        raise ConfigError(f"{source}: " + " ".join(seen)) from None


def validate_section(section: type[BaseModel], values: dict[str, Any], key: str, source: str) -> Any:
    """One section of the tree (e.g. `eval` with the CLI's flags applied), or one `ConfigError` naming its keys."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        seen: list[str] = []
        for err in exc.errors():
            msg = _explain({**err, "loc": (key, *err["loc"])})
            if msg not in seen:
                seen.append(msg)
        raise ConfigError(f"{source}: " + " ".join(seen)) from None


def load_config(path: str | Path | None, overrides: list[str] = (), extra: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides (then `extra`), and validate it."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist.")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"config file '{p}' is not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
                              f"{exc.start} (line {line}) cannot be decoded. Save the file as UTF-8.") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
        except (ValueError, OverflowError, RecursionError) as exc:  # YAML that Python cannot build (a date 2024-13-45)
            why = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ConfigError(f"config file '{p}' holds a value that cannot be read ({why}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of keys (model:, data:, train:, ...).")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, source)
    for key, value in (extra or {}).items():
        _set_dotted(tree, key, value, source)
    return validate_config(tree, source)


def dump_config(config: Config) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
