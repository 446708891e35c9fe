"""`tunelab plan`: read the config and the real data, estimate every strategy, and advise."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.plan.advisor import Advice, Situation, advise
from tunelab.plan.devices import Device, get_device, runtime_bytes
from tunelab.plan.estimate import (CPU_STEP_MODEL, DataShape, Estimate, ModelShape, Workload, flops, memory, model_shape,
                                   parameter_counts, trains_weights, workload)

STRATEGIES = ["prompting", "soft_prompt", "lora", "freeze", "full", "prompt_lm"]
# Published pre-training token counts of known families, keyed by (model_type, vocab size).
PRETRAINING_TOKENS: dict[tuple[str, int], tuple[float, str]] = {
    ("llama", 512): (6.5536e9, "llama2.c stories260K: 100,000 iterations x 128 x 512 tokens (stories260K.md)"),
    ("llama", 32000): (2e12, "Llama 2 paper (Touvron et al. 2023): 2T tokens"),
    ("llama", 128256): (15e12, "Llama 3 model card: over 15T tokens"),
    ("qwen2", 151936): (18e12, "Qwen2.5 technical report: 18T tokens"),
    ("qwen3", 151936): (36e12, "Qwen3 technical report: 36T tokens"),
    ("gemma2", 256000): (2e12, "Gemma 2 report: 2T tokens for the 2B model (8T for 9B, 13T for 27B)"),
}
# The error of the estimates, measured by tests/plan/test_validation.py on a 2-core CPU (see BENCHMARKS.md).
VALIDATED_ERROR = ("memory within 5% of measured peaks on a 2-core CPU (tests/plan); the CPU step time "
                   "is off by up to 2x on a workload unlike its calibration's (see BENCHMARKS.md)")


@dataclass
class PlanResult:
    estimates: dict[str, Estimate]
    advice: Advice
    device: Device
    data: DataShape
    pretraining: tuple[float, str] | None
    config_strategy: str

    def as_dict(self) -> dict[str, Any]:
        out = {name: e.as_dict() for name, e in self.estimates.items()}
        for name, e in out.items():
            e["recommendation"] = {"strategy": self.advice.strategy, "settings": self.advice.settings,
                                   "reasons": self.advice.reasons} if name == self.advice.strategy else None
        return {"configured_strategy": self.config_strategy, "device": vars(self.device), "data": vars(self.data),
                "strategies": out, "recommendation": {"strategy": self.advice.strategy, "settings": self.advice.settings,
                                                      "reasons": self.advice.reasons, "rule": self.advice.rule},
                "pretraining_tokens": self.pretraining[0] if self.pretraining else None,
                "pretraining_source": self.pretraining[1] if self.pretraining else None,
                "estimate_error": VALIDATED_ERROR}


def data_shape(cfg: Config) -> DataShape:
    """Token counts from the real tokenized training data (rendered and encoded as training will)."""
    from tunelab.data.dataset import load_datasets
    from tunelab.data.render import spec_from_config
    from tunelab.models.load import load_tokenizer

    train, _ = load_datasets(cfg.data, spec_from_config(cfg), load_tokenizer(cfg.model), cfg.train.seed)
    lengths = [len(e.input_ids) for e in train.encoded]
    return DataShape(len(lengths), sum(lengths), train.stats.num_label_tokens, statistics.fmean(lengths),
                     statistics.fmean(n * n for n in lengths), train.stats.num_label_tokens / len(lengths),
                     len({ex.target for ex in train.examples}), train.examples[0].shape)


def task_kind(data: DataShape) -> str:
    if data.shape == "text_label" or data.distinct_targets <= 50 and data.distinct_targets < data.num_examples / 4:
        return "classification"
    return "short_answer" if data.mean_label_tokens <= 32 else "long_generation"


def step_seconds(shape: ModelShape, cfg: Config, device: Device, run_flops: float, w: Workload) -> float:
    """FLOPs at the device's rate and MFU; on a CPU, the calibrated model of CPU_STEP_MODEL."""
    if not device.name.startswith("this CPU"):
        return run_flops / w.steps / (device.peak_flops * device.mfu)
    share, elementwise_ops = CPU_STEP_MODEL[trains_weights(cfg.strategy)]
    return run_flops / w.steps / (device.peak_flops * share) + elementwise_ops * device.elementwise_seconds * \
        shape.layers * w.tokens_per_step * (shape.hidden + shape.intermediate)


def plan(cfg: Config, device_name: str = "cpu", pretraining_tokens: float | None = None,
         strategies: list[str] | None = None, compare_json: Path | None = None) -> PlanResult:
    shape = model_shape(cfg.model.path, cfg.model.trust_remote_code)
    data = data_shape(cfg)
    device = get_device(device_name)
    runtime = runtime_bytes() if device_name == "cpu" else None
    estimates: dict[str, Estimate] = {}
    names = list(dict.fromkeys([cfg.strategy.name, *(strategies or STRATEGIES)]))
    for name in names:
        tree = cfg.model_dump(mode="json")
        tree["strategy"]["name"] = name
        if name == "freeze" and not (cfg.strategy.freeze.trainable_layers or cfg.strategy.freeze.modules):
            tree["strategy"]["freeze"] = {"trainable_layers": max(1, shape.layers // 4)}
        if name == "fixed_prompt" and cfg.strategy.template is None:
            continue
        scfg = Config.model_validate(tree)
        trainable, total = parameter_counts(shape, scfg.strategy)
        w = workload(scfg, data)
        run_flops = flops(shape, w, data, scfg)
        mem = memory(shape, w, scfg, trainable, total, cfg.train.activation_checkpointing, cpu_runtime=runtime)
        mem_other = memory(shape, w, scfg, trainable, total, not cfg.train.activation_checkpointing, cpu_runtime=runtime)
        mem["activations_with_checkpointing" if not cfg.train.activation_checkpointing else
            "activations_without_checkpointing"] = mem_other["activations"]
        sec = step_seconds(shape, scfg, device, run_flops, w) if run_flops else 0.0
        adapter = trainable * 4 if name not in ("full", "freeze", "prompting", "prompt_lm") else 0
        estimates[name] = Estimate(name, total, trainable, adapter, mem, run_flops, sec * w.steps, sec)
    pre = None
    if pretraining_tokens:
        pre = (pretraining_tokens, "--pretraining-tokens")
    else:
        import transformers

        mt = transformers.AutoConfig.from_pretrained(cfg.model.path).model_type
        pre = PRETRAINING_TOKENS.get((mt, shape.vocab))
    gib = {k: e.memory_bytes["total"] / 2**30 for k, e in estimates.items()}
    situation = Situation(data.num_examples, data.num_label_tokens, task_kind(data), cfg.plan.retention,
                          {k: e.memory_bytes["total"] <= device.memory_bytes for k, e in estimates.items()},
                          {k: e.trainable_params / e.total_params for k, e in estimates.items()}, gib,
                          device.memory_bytes / 2**30)
    return PlanResult(estimates, advise(situation, compare_json), device, data, pre, cfg.strategy.name)


def write_plan(result: PlanResult, path: str) -> None:
    Path(path).write_text(json.dumps(result.as_dict(), indent=2))
