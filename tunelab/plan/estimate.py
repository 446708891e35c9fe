"""Estimates from the model's config and the real tokenized data: parameters, memory, FLOPs, time.

Parameter counts are exact (the model is built on the meta device; adapters are counted by peft's
own layer shapes). Memory and time are models with stated terms; tests/plan measures their error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config
from tunelab.models.layers import decoder_layers
from tunelab.strategies.registry import parameter_counts, resolve  # noqa: F401  (the registry counts parameters)

BYTES_FP32 = 4
# optimizer states per trainable parameter, in fp32 tensors' worth (x 4 bytes): AdamW's exp_avg and exp_avg_sq;
# bitsandbytes' 8-bit AdamW keeps both as 1-byte codes with an fp32 scale per block of 256 (tensors under 4096 values
# keep fp32 states: a rounding error for any model worth planning); SGD (no momentum) none
_EIGHT_BIT_ADAM = 2 * (1 + BYTES_FP32 / 256) / BYTES_FP32
OPTIMIZER_STATES = {"adamw": 2, "adamw_8bit": _EIGHT_BIT_ADAM, "paged_adamw_8bit": _EIGHT_BIT_ADAM, "sgd": 0}
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block: one scale per 64 weights


@dataclass
class ModelShape:
    """What the estimates need to know about the model, read from a meta-device build of its config."""

    total_params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layer_params: list[int]
    param_names: dict[str, int]  # name -> numel (unique parameters)
    linears: list[tuple[str, int, int]]  # (module name, in_features, out_features) of the decoder's Linear layers
    model_type: str = ""  # the config's model_type (peft's per-family adapter targets)
    embedding_dim: int = 0  # the token embeddings' width (0: the hidden size; OPT-350m's is narrower)
    vocab_table_params: int = 0  # the token embedding's parameters, and an untied output head's

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def body_matmul_params(self) -> int:
        """Parameters used in matrix products per token, except the output head."""
        return sum(i * o for _, i, o in self.linears)


def linear_features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: torch's Linear, or transformers' Conv1D (GPT-2's, whose weight is (in, out))."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def model_shape(model_path: str, trust_remote_code: bool = False) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.errors import ModelError

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = "it does not exist" if not Path(model_path).expanduser().exists() else str(exc).splitlines()[0]
        raise ModelError(f"cannot read the model's config.json from model.path '{model_path}': {reason}. Set model.path "
                         "to a local Hugging Face model folder; to plan, config.json and the tokenizer files are "
                         "enough (the weights are not read).") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    head = model.get_output_embeddings()
    linears = [(n, *linear_features(m)) for n, m in model.named_modules()
               if linear_features(m) is not None and m is not head]
    layers = decoder_layers(model)
    return ModelShape(
        total_params=sum(p.numel() for p in model.parameters()), layers=len(layers), hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        layer_params=[sum(p.numel() for p in layer.parameters()) for layer in layers],
        param_names={n: p.numel() for n, p in model.named_parameters()}, linears=linears,
        model_type=config.model_type, embedding_dim=model.get_input_embeddings().embedding_dim,
        vocab_table_params=sum({id(t): t.numel() for t in (model.get_input_embeddings().weight,
                                                           getattr(head, "weight", None)) if t is not None}.values()))


@dataclass
class DataShape:
    """The real tokenized data: counts and the lengths that set FLOPs and activation sizes."""

    num_examples: int
    num_tokens: int
    num_label_tokens: int
    mean_length: float
    mean_square_length: float  # E[len^2], for the attention term
    mean_label_tokens: float
    distinct_targets: int
    shape: str


@dataclass
class Workload:
    steps: int
    tokens_per_step: float
    label_tokens_per_step: float
    tokens_per_micro_batch: float  # the activation-size driver
    micro_batches_per_step: int


def planned_epochs(w: Workload, data: DataShape) -> float:
    """Passes over the training data that the workload's steps make."""
    return w.steps * w.tokens_per_step / max(1, data.num_tokens)


def workload(cfg: Config, data: DataShape) -> Workload:
    t = cfg.train
    if t.tokens_per_step is not None:
        micro = t.tokens_per_micro_batch or t.tokens_per_step
        per_step, micro_tokens, n_micro = t.tokens_per_step, micro, t.tokens_per_step // micro
    else:
        per_step = t.batch_size * t.grad_accum * data.mean_length
        micro_tokens, n_micro = t.batch_size * data.mean_length, t.grad_accum
    steps = t.max_steps or max(1, round((t.epochs or 1) * data.num_tokens / per_step))
    return Workload(steps, per_step, per_step * data.num_label_tokens / max(1, data.num_tokens), micro_tokens, n_micro)


@dataclass
class Estimate:
    strategy: str
    total_params: int
    trainable_params: int
    adapter_bytes: int
    memory_bytes: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    seconds: float = 0.0
    step_seconds: float = 0.0
    time_source: str = ""  # how the step time was obtained: measured on this CPU, or FLOPs at a device's rate
    fit_changes: list[str] = field(default_factory=list)  # when it does not fit the device: what to change

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Activations autograd keeps per token of one decoder layer, in units of 4 bytes: the norm inputs and
# outputs, q/k/v (before and after RoPE), the attention output, and the MLP's gate, up, activation and
# product (LLaMA-style block; counted from PyTorch's saved tensors, see tests/plan).
def activation_floats_per_token_layer(s: ModelShape) -> float:
    return 6 * s.hidden + 4 * s.kv_dim + 4 * s.intermediate


# How much more (or less) than the saved-tensor count a training step really holds, by what trains: trained
# weights keep their layer inputs; LoRA adds dropout masks and adapter inputs per module; a frozen model keeps
# only what input gradients need. With CPU_BYTES_PER_TOKEN, fitted on 2026-12-02 to the measured peak resident
# memory of 20 runs on a 2-core AMD EPYC, PyTorch 2.13 (stories260K and two config-built sizes x full, lora,
# soft_prompt and freeze, at 1,024 and 3,072 tokens per step; the fit is within 5% on all but one, medium
# soft_prompt, +15% and -9%), and checked against the same cases measured on an Intel Xeon on 2026-11-29
# (within 17%); see BENCHMARKS.md. tests/plan/test_validation.py asserts 25%.
ACTIVATION_FACTOR = {"weights": 1.25, "adapter": 2.5, "frozen": 0.7}  # by TuningStrategy.cost_class


def lora_dropped_copy_share(shape: ModelShape) -> float:
    """The share of ACTIVATION_FACTOR["adapter"] that peft's LoRA dropout held when it was fitted (LoRA, dropout
    0.05): a dropped copy of every adapted layer's input (q, k, v, gate and up read the hidden state, o reads the
    attention output, down the MLP's intermediate), in units of activation_floats_per_token_layer. tunelab's own
    LoRA dropout (strategies/lora_dropout.py) keeps a one-byte mask instead, and no dropout keeps nothing; DoRA
    keeps peft's dropout."""
    return (6 * shape.hidden + shape.intermediate) / activation_floats_per_token_layer(shape)


# On the CPU, per token of a micro-batch, whatever the model's size: the collated batch and masks, and the
# allocator's slack around a step's many differently-shaped buffers (35 KiB, fitted as above).
CPU_BYTES_PER_TOKEN = 35 * 2**10


def memory(shape: ModelShape, w: Workload, cfg: Config, trainable: int, total: int, checkpointing: bool,
           chunk: int = 1024, cpu_runtime: float | None = None) -> dict[str, float]:
    """Peak memory on one device, by part (bytes). On the CPU (`cpu_runtime` given: the measured
    resident memory of the imported training stack) the loaded weights are counted twice: the
    allocator keeps the load-time copy."""
    s = resolve(cfg.strategy)
    frozen_below = s.base == "chosen" and cfg.strategy.freeze.trainable_layers
    layers_saved = (cfg.strategy.freeze.trainable_layers if frozen_below else shape.layers) if s.trains_anything else 0
    per_token_layer = activation_floats_per_token_layer(shape) * BYTES_FP32
    tokens = w.tokens_per_micro_batch
    factor = ACTIVATION_FACTOR[s.cost_class]
    lora = cfg.strategy.lora
    if s.peft_type == "LORA" and not (lora.variant == "dora" and lora.dropout > 0):
        factor -= lora_dropped_copy_share(shape)
    if checkpointing:
        activations = layers_saved * tokens * shape.hidden * BYTES_FP32 + tokens * per_token_layer * factor
    else:
        activations = layers_saved * tokens * per_token_layer * factor
    head_trains = s.trains_base_weights
    label_tokens = min(chunk, w.label_tokens_per_step / w.micro_batches_per_step)
    loss = 2 * label_tokens * shape.vocab * BYTES_FP32 + (shape.vocab * shape.hidden * BYTES_FP32 if head_trains else 0)
    weights = base_weight_bytes(shape, cfg, total)
    parts = {"weights": weights + (total * BYTES_FP32 if cpu_runtime is not None else 0),
             "gradients": trainable * BYTES_FP32,
             "optimizer": trainable * OPTIMIZER_STATES[cfg.train.optimizer] * BYTES_FP32, "activations": activations,
             "loss_buffer": loss}
    if cfg.strategy.lora.quantize is not None:
        parts["dequantization"] = dequantization_bytes(shape, cfg, cpu_runtime is not None)
    if cpu_runtime is not None:
        parts["runtime"] = cpu_runtime + CPU_BYTES_PER_TOKEN * tokens
    parts["total"] = sum(parts.values())
    return parts


def quantized_bytes_per_weight(quantize: str, double_quant: bool) -> float:
    """Bytes per weight of a bitsandbytes-quantized linear layer, its scales included: 4-bit codes with an fp32
    absmax per block of 64 (double quantization: an 8-bit absmax per block, an fp32 scale per 256 blocks), or
    LLM.int8's 1-byte codes (its fp32 row scales are counted per row in base_weight_bytes)."""
    if quantize == "int8":
        return 1.0
    scales = (1 + BYTES_FP32 / 256) / QUANT_BLOCK if double_quant else BYTES_FP32 / QUANT_BLOCK
    return 0.5 + scales


def base_weight_bytes(shape: ModelShape, cfg: Config, total: int) -> float:
    """The loaded model's weights: fp32, or with strategy.lora.quantize the decoder's linear layers quantized (with
    quantize_embeddings the embedding tables too) and the rest (embeddings, norms, an untied output head) in fp32,
    as peft's k-bit preparation leaves them."""
    q = cfg.strategy.lora
    if q.quantize is None:
        return total * BYTES_FP32
    quantized = quantized_params(shape, cfg)
    per_row = sum(o for _, _, o in shape.linears) * BYTES_FP32 if q.quantize == "int8" else 0
    return quantized * quantized_bytes_per_weight(q.quantize, q.double_quant) + per_row + \
        (total - quantized) * BYTES_FP32


def quantized_params(shape: ModelShape, cfg: Config) -> int:
    """The parameters strategy.lora.quantize stores as codes: the decoder's linear layers, and with
    quantize_embeddings the token embedding and an untied output head."""
    return shape.body_matmul_params + (shape.vocab_table_params if cfg.strategy.lora.quantize_embeddings else 0)


def compute_bytes(cfg: Config, on_cpu: bool) -> int:
    """Bytes per value of a quantized layer's compute dtype (auto: float32 on the CPU, bfloat16 on a GPU)."""
    dtype = cfg.strategy.lora.compute_dtype
    return BYTES_FP32 if dtype == "float32" or (dtype == "auto" and on_cpu) else 2


def dequantization_bytes(shape: ModelShape, cfg: Config, on_cpu: bool) -> float:
    """The transient dequantized copy a quantized layer multiplies with (one layer at a time): the largest
    linear layer's weight in the compute dtype, twice (the forward's copy, and the backward's for the input
    gradient, which autograd may hold at once)."""
    largest = max((i * o for _, i, o in shape.linears), default=0)
    if cfg.strategy.lora.quantize_embeddings:  # the vocabulary's table, dequantized whole for the head's matmul
        largest = max(largest, shape.vocab * shape.hidden)
    return 2 * largest * compute_bytes(cfg, on_cpu)


def dequantization_seconds(shape: ModelShape, w: Workload, cfg: Config, bandwidth: float, on_cpu: bool) -> float:
    """Per optimizer step, the memory-bound work a quantized base adds: every quantized weight is expanded to the
    compute dtype in each micro-batch's forward and again in its backward (codes read, values written)."""
    q = cfg.strategy.lora
    if q.quantize is None or not bandwidth:
        return 0.0
    per_weight = quantized_bytes_per_weight(q.quantize, q.double_quant) + compute_bytes(cfg, on_cpu)
    return w.micro_batches_per_step * 2 * quantized_params(shape, cfg) * per_weight / bandwidth


def flops(shape: ModelShape, w: Workload, data: DataShape, cfg: Config) -> float:
    """FLOPs of the run: forward 2N per token (the head only at target tokens) plus causal attention;
    backward 2x forward where weights train, 1x where only gradients pass through."""
    s = resolve(cfg.strategy)
    if not s.trains_anything:
        return 0.0
    layer_fwd = 2 * shape.body_matmul_params / shape.layers  # per token per layer
    attention_fwd = 2 * 2 * shape.heads * shape.head_dim * data.mean_square_length / data.mean_length / 2
    per_layer = layer_fwd + attention_fwd
    head_fwd = 2 * shape.hidden * shape.vocab * w.label_tokens_per_step
    body_fwd = shape.layers * per_layer * w.tokens_per_step
    if s.trains_base_weights:
        backward = 2 * (body_fwd + head_fwd)
    elif s.base == "chosen" and cfg.strategy.freeze.trainable_layers:
        k = cfg.strategy.freeze.trainable_layers
        backward = head_fwd + 2 * k * per_layer * w.tokens_per_step  # no gradient below the lowest trained layer
    else:  # adapters and soft prompts: activation gradients through every layer, weight gradients only for adapters
        backward = head_fwd + body_fwd
    return w.steps * (body_fwd + head_fwd + backward)
