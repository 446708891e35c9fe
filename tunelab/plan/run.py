"""`tunelab plan`: read the config and the real data, estimate every strategy, and advise."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.plan.advisor import Advice, QuantizedLora, Situation, advise
from tunelab.plan.devices import Device, RuntimeProbe, get_device
from tunelab.plan.estimate import (DataShape, Estimate, ModelShape, Workload, dequantization_seconds, flops, memory,
                                    model_shape, parameter_counts, planned_epochs, workload)
from tunelab.strategies.registry import STRATEGIES, planned_strategies, resolve

# Published pre-training token counts of known families, keyed by (model_type, vocab size).
PRETRAINING_TOKENS: dict[tuple[str, int], tuple[float, str]] = {
    ("llama", 512): (6.5536e9, "llama2.c stories260K: 100,000 iterations x 128 x 512 tokens (stories260K.md)"),
    ("llama", 32000): (2e12, "Llama 2 paper (Touvron et al. 2023): 2T tokens"),
    ("llama", 128256): (15e12, "Llama 3 model card: over 15T tokens"),
    ("qwen2", 151936): (18e12, "Qwen2.5 technical report: 18T tokens"),
    ("qwen3", 151936): (36e12, "Qwen3 technical report: 36T tokens"),
    ("gemma2", 256000): (2e12, "Gemma 2 report: 2T tokens for the 2B model (8T for 9B, 13T for 27B)"),
}
MEASURED = "measured on this CPU: real optimizer steps of cut copies of the model (tunelab plan --measure)"
# A step timer: (strategy config, decoder layers, encoded examples, tokenizer) -> seconds per optimizer step.
# `tunelab plan --measure` passes tunelab.train.timing.measured_step_seconds; plan/ itself runs no model.
StepTimer = Callable[[Config, int, list[Any], Any], float]
# The error of the estimates: memory by tests/plan/test_validation.py, step time by bench/plan_validation.py,
# both on a 2-core CPU (see BENCHMARKS.md).
VALIDATED_ERROR = ("on a 2-core CPU (GSM8K rows of 512; tests/plan and bench/plan_validation.py, see BENCHMARKS.md): "
                   "memory within 17% of the measured peaks; step time with --measure within 23% (cut copies of "
                   "the model timed; up to 31% off when the shared machine slowed a run), without it the FLOPs at "
                   "this CPU's matmul rate, a lower bound; GPU times are FLOPs at an assumed MFU, not yet checked "
                   "against a GPU")


@dataclass
class PlanResult:
    estimates: dict[str, Estimate]
    advice: Advice
    device: Device
    data: DataShape
    pretraining: tuple[float, str] | None
    config_strategy: str
    situation: Situation  # what the advice was given for

    def as_dict(self) -> dict[str, Any]:
        out = {name: e.as_dict() for name, e in self.estimates.items()}
        for name, e in out.items():
            s = STRATEGIES[name]
            e["taxonomy"] = {"lm": s.lm, "prompt": s.prompt, "trains": s.trains}
            e["recommendation"] = {"strategy": self.advice.strategy, "settings": self.advice.settings,
                                   "reasons": self.advice.reasons} if name == self.advice.strategy else None
        return {"configured_strategy": self.config_strategy, "device": vars(self.device), "data": vars(self.data),
                "strategies": out, "recommendation": {"strategy": self.advice.strategy, "settings": self.advice.settings,
                                                      "reasons": self.advice.reasons, "rule": self.advice.rule},
                "pretraining_tokens": self.pretraining[0] if self.pretraining else None,
                "pretraining_source": self.pretraining[1] if self.pretraining else None,
                "estimate_error": VALIDATED_ERROR}


def load_train_data(cfg: Config) -> tuple[DataShape, list[Any], Any]:
    """Token counts from the real tokenized training data (rendered and encoded as training will), the
    encoded examples and the tokenizer."""
    from tunelab.data.dataset import load_datasets
    from tunelab.data.render import spec_from_config
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    train, _ = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)
    lengths = train.encoded.lengths
    shape = DataShape(len(lengths), sum(lengths), train.stats.num_label_tokens, statistics.fmean(lengths),
                      statistics.fmean(n * n for n in lengths), train.stats.num_label_tokens / len(lengths),
                      train.distinct_targets(), train.shape)
    return shape, train.encoded, tokenizer


def task_kind(data: DataShape) -> str:
    if data.shape == "text_label" or data.distinct_targets <= 50 and data.distinct_targets < data.num_examples / 4:
        return "classification"
    return "short_answer" if data.mean_label_tokens <= 32 else "long_generation"


def fit_changes(shape: ModelShape, w: Workload, cfg: Config, trainable: int, total: int, mem: dict[str, float],
                device: Device, runtime: float | None, others: dict[str, float]) -> list[str]:
    """What to change when a strategy's peak memory does not fit the device, each with the total it gives."""
    cap = device.memory_bytes
    if mem["total"] <= cap:
        return []

    def gib(b: float) -> str:
        return f"{b / 2**30:.1f} GiB"

    def total_with(work: Workload, checkpointing: bool) -> float:
        return memory(shape, work, cfg, trainable, total, checkpointing, cpu_runtime=runtime)["total"]

    checkpointing = cfg.train.activation_checkpointing
    out = []
    if not checkpointing:
        out.append(f"train.activation_checkpointing: true (keeps one layer's activations: {gib(total_with(w, True))})")
    t, n = cfg.train, 2
    while True:  # micro-batches 2x, 4x, ... smaller, accumulated to the same optimizer step
        if t.tokens_per_step:
            micro = int(t.tokens_per_micro_batch or t.tokens_per_step) // n
            if micro < cfg.data.max_length:  # a micro-batch holds at least one row
                break
            change, tokens = f"train.tokens_per_micro_batch: {micro}", float(micro)
        else:
            rows = t.batch_size // n
            if rows < 1:
                break
            change = f"train.batch_size: {rows} with train.grad_accum: {t.grad_accum * n}"
            tokens = w.tokens_per_micro_batch * rows / t.batch_size
        smaller = replace(w, tokens_per_micro_batch=tokens, micro_batches_per_step=w.micro_batches_per_step * n)
        m = total_with(smaller, True)
        if m <= cap:
            out.append(f"{change} (micro-batches {n}x smaller, the same tokens per optimizer step"
                       f"{', with activation checkpointing' if not checkpointing else ''}: {gib(m)})")
            break
        n *= 2
    fitting = [f"{k} ({gib(v)})" for k, v in others.items()
               if v <= cap and k != cfg.strategy.name and STRATEGIES[k].trains_anything]
    if fitting:
        out.append("another strategy: " + ", ".join(fitting))
    sharded = mem["weights"] + mem["gradients"] + mem["optimizer"]
    rest = mem["total"] - sharded
    if rest < cap and not device.name.startswith("this CPU"):
        gpus = math.ceil(sharded / (cap - rest))
        out.append(f"{gpus} GPUs with distributed.strategy: fsdp2 (weights, gradients and optimizer states sharded: "
                   f"{gib(rest + sharded / gpus)} on each)")
    if not out:
        out.append(f"a device with more than {gib(mem['total'])} of memory")
    return out


@dataclass
class QuantizedOffer:
    """LoRA over a 4-bit NF4 base (QLoRA), planned for when 16-bit LoRA does not fit."""

    memory_bytes: float
    slowdown: float  # its step time over 16-bit LoRA's (the dequantization of every weight in each pass)
    change: str  # the plan's 'to fit' line
    situation: QuantizedLora  # what the advisor reads


QLORA_SETTINGS = {"strategy.lora.quantize": "nf4", "strategy.lora.double_quant": True}


def quantized_offer(shape: ModelShape, data: DataShape, cfg: Config, device: Device, runtime: float | None,
                    estimates: dict[str, Estimate]) -> QuantizedOffer | None:
    """QLoRA's memory and its step time relative to LoRA's, when LoRA over the 16-bit base does not fit the device
    (None when LoRA fits, was not planned, or the config already quantizes)."""
    lora = estimates.get("lora")
    if lora is None or cfg.strategy.lora.quantize is not None or lora.memory_bytes["total"] <= device.memory_bytes:
        return None
    qcfg = cfg.for_strategy("lora", QLORA_SETTINGS, "tunelab plan, LoRA over a 4-bit base")
    trainable, total = parameter_counts(shape, qcfg.strategy)
    w = workload(qcfg, data)
    mem = memory(shape, w, qcfg, trainable, total, cfg.train.activation_checkpointing, cpu_runtime=runtime)
    extra = dequantization_seconds(shape, w, qcfg, device.memory_bandwidth, device.name.startswith("this CPU"))
    slowdown = (lora.step_seconds + extra) / lora.step_seconds if lora.step_seconds else 1.0
    gib = mem["total"] / 2**30
    change = (f"strategy.lora.quantize: nf4 (QLoRA: the frozen base in 4 bits with double quantization, "
              f"{gib:.1f} GiB; each step about {slowdown:.2f}x LoRA's time, as every 4-bit weight is dequantized in "
              "each forward and backward)")
    return QuantizedOffer(mem["total"], slowdown, change,
                          QuantizedLora(gib, mem["total"] <= device.memory_bytes, slowdown))


def plan(cfg: Config, device_name: str = "cpu", pretraining_tokens: float | None = None,
         strategies: list[str] | None = None, compare_json: Path | None = None,
         step_timer: StepTimer | None = None) -> PlanResult:
    """Estimate every strategy (or `strategies`) for `cfg` on a device, and advise, from shapes and token
    counts alone (seconds, for any model). With a `step_timer` on the CPU, each trained strategy's step is
    timed by it instead (a few seconds each); without one the time is FLOPs at the measured matmul rate."""
    on_cpu = device_name == "cpu"
    probe = RuntimeProbe() if on_cpu else None  # runs beside the reading of the model and the data
    shape = model_shape(cfg.model.path, cfg.model.trust_remote_code)
    data, examples, tokenizer = load_train_data(cfg)
    device = get_device(device_name)
    runtime = probe.bytes() if probe else None
    estimates: dict[str, Estimate] = {}
    prepared: dict[str, tuple[Config, Workload]] = {}
    names = list(dict.fromkeys([cfg.strategy.name, *(strategies or planned_strategies())]))
    for name in names:
        if STRATEGIES[name].requires_template and cfg.strategy.template is None:
            continue
        chosen = cfg.strategy.freeze.trainable_layers or cfg.strategy.freeze.modules
        default_choice = {"strategy.freeze": {"trainable_layers": max(1, shape.layers // 4)}} \
            if STRATEGIES[name].base == "chosen" and not chosen else {}  # the top quarter of the layers
        if cfg.strategy.lora.quantize is not None and not STRATEGIES[name].quantizable_base:
            default_choice["strategy.lora.quantize"] = None  # a strategy that trains base weights plans unquantized
        scfg = cfg.for_strategy(name, default_choice, f"tunelab plan, strategy {name}")
        trainable, total = parameter_counts(shape, scfg.strategy)
        w = workload(scfg, data)
        run_flops = flops(shape, w, data, scfg)
        mem = memory(shape, w, scfg, trainable, total, cfg.train.activation_checkpointing, cpu_runtime=runtime)
        mem_other = memory(shape, w, scfg, trainable, total, not cfg.train.activation_checkpointing, cpu_runtime=runtime)
        mem["activations_with_checkpointing" if not cfg.train.activation_checkpointing else
            "activations_without_checkpointing"] = mem_other["activations"]
        sec, source = 0.0, "nothing trains"
        dequantizing = dequantization_seconds(shape, w, scfg, device.memory_bandwidth, on_cpu)
        if run_flops and on_cpu and step_timer and mem["total"] <= device.memory_bytes:
            sec, source = step_timer(scfg, shape.layers, examples, tokenizer), MEASURED  # its copies quantized
        elif run_flops:
            sec = run_flops / w.steps / (device.peak_flops * device.mfu) + dequantizing
            source = f"FLOPs at {device.mfu:.0%} of {device.peak_flops / 1e12:.3g} TFLOP/s"
            if on_cpu:  # a rough bound: real steps run well below a 512^3 product's rate (BENCHMARKS.md)
                source += (" (this CPU's 512^3 matmul rate; steps not timed: "
                           f"{'it does not fit' if step_timer else 'pass --measure to time them'})")
        adapter = trainable * 4 if resolve(scfg.strategy).saves == "adapter" else 0
        estimates[name] = Estimate(name, total, trainable, adapter, mem, run_flops, sec * w.steps, sec, source)
        prepared[name] = (scfg, w)
    totals = {k: e.memory_bytes["total"] for k, e in estimates.items()}
    offer = quantized_offer(shape, data, cfg, device, runtime, estimates)
    for name, e in estimates.items():
        scfg, w = prepared[name]
        e.fit_changes = fit_changes(shape, w, scfg, e.trainable_params, e.total_params, e.memory_bytes, device,
                                    runtime, totals)
        if offer and e.fit_changes and STRATEGIES[name].quantizable_base and STRATEGIES[name].adds == "adapter":
            e.fit_changes.insert(0, offer.change)
    pre = None
    if pretraining_tokens:
        pre = (pretraining_tokens, "--pretraining-tokens")
    else:
        import transformers

        mt = transformers.AutoConfig.from_pretrained(cfg.model.path).model_type
        pre = PRETRAINING_TOKENS.get((mt, shape.vocab))
    gib = {k: v / 2**30 for k, v in totals.items()}
    situation = Situation(data.num_examples, data.num_label_tokens, task_kind(data), cfg.plan.retention,
                          {k: v <= device.memory_bytes for k, v in totals.items()},
                          {k: e.trainable_params / e.total_params for k, e in estimates.items()}, gib,
                          device.memory_bytes / 2**30, quantized_lora=offer.situation if offer else None,
                          epochs=planned_epochs(workload(cfg, data), data))
    return PlanResult(estimates, advise(situation, compare_json), device, data, pre, cfg.strategy.name, situation)


def write_plan(result: PlanResult, path: str) -> None:
    Path(path).write_text(json.dumps(result.as_dict(), indent=2))
