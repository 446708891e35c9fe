"""The strategy advisor: which strategy, with which key settings, and why (citing the figures).

Rules (each with its source; the documented table of situations is in tests/plan/test_counts_and_advisor.py):
1. No labeled data to speak of (< 8 examples): tuning-free prompting, the examples as few-shot
   demonstrations (Brown et al. 2020; Liu et al. 2021, sec. 7).
2. Full fine-tuning does not fit the device's memory: LoRA if it fits (Hu et al. 2021), else LoRA over a
   4-bit NF4 base if that fits (QLoRA, Dettmers et al. 2023), with its memory and its step-time cost, else a soft
   prompt with activation checkpointing (Lester et al. 2021: only the prompt trains); when not even
   that fits, LoRA with its model sharded over several GPUs by FSDP2.
3. Under ~100 examples: LoRA (rank 16), whose adapter detached leaves the base exactly as it was;
   low retention and room for it -> full. Measured (the demo's task 3, 64 examples, every strategy):
   LoRA scored ROUGE-L 0.38 against a soft prompt's 0.10, both exactly the base with the adaptation
   off, so the earlier rule (high retention -> soft prompt, Lester et al. 2021) changed; full scored
   best (0.43) at x1.52 general-text perplexity, which only low retention accepts.
4. ~100 to 10,000 examples: LoRA (rank 8 for high retention, 16 otherwise): it learns less but
   forgets less than full tuning (Biderman et al. 2024); low retention and room for it -> full, when the
   planned steps make at least one pass over the data. Measured (bench/real_model.py, SmolLM2-135M on
   2,000 banking77 chats, 60 steps of 16: under half an epoch): LoRA 0.32 accuracy, full 0.07; with
   several epochs (the demo's task 1, 400 tickets) full scored best.
5. 10,000 examples or more and a large budget: full fine-tuning (or prompt+LM tuning when a task
   prompt helps), unless retention is high -> LoRA of rank 64.
6. Where `tunelab compare` results for similar data exist, the measured comparison outranks the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.evaluate.verdicts import PPL_MILD, PPL_STRONG, retained_perplexity_ratio
from tunelab.runfiles import read_json
from tunelab.strategies.registry import STRATEGIES


@dataclass
class QuantizedLora:
    """LoRA over a 4-bit NF4 base (QLoRA), as planned where 16-bit LoRA does not fit."""

    memory_gib: float
    fits: bool
    slowdown: float  # its step time over 16-bit LoRA's


@dataclass
class Situation:
    num_examples: int
    target_tokens: int
    task: str  # "classification" (few labels), "short_answer", "long_generation"
    retention: str  # "low" | "medium" | "high"
    fits: dict[str, bool]  # strategy -> whether its peak memory fits the device
    trainable_share: dict[str, float] = field(default_factory=dict)
    memory_gib: dict[str, float] = field(default_factory=dict)
    device_gib: float = 0.0
    large_budget: bool = True  # the full-tuning time is within the user's compute budget
    quantized_lora: QuantizedLora | None = None  # planned where 16-bit LoRA does not fit
    epochs: float = math.inf  # passes over the training data the planned steps make


@dataclass
class Advice:
    strategy: str
    settings: dict[str, Any]
    reasons: str
    rule: str


# How much general-text forgetting each retention level accepts (tuned / base perplexity, with the adaptation off
# where it comes off): the diff's verdict thresholds, no measurable forgetting and mild forgetting.
RETENTION_FORGETTING = {"high": PPL_MILD, "medium": PPL_STRONG, "low": math.inf}


def measured_pick(rows: list[dict[str, Any]], metric: str, retention: str, tolerance: float = 0.02) -> str | None:
    """The strategy a measured comparison (compare.json's table) supports at a retention level: among the rows
    whose forgetting that level accepts, the best task score (within `tolerance` of it, the least forgetting).
    Unlike the comparison's recommendation it does not ask whether any row beats the model-free baselines."""
    kept = [r for r in rows if retained_perplexity_ratio(r) <= RETENTION_FORGETTING[retention]]
    if not kept:
        return None
    best = max(r[metric] for r in kept)
    close = [r for r in kept if r[metric] >= best - tolerance]
    return min(close, key=lambda r: (retained_perplexity_ratio(r), -r[metric]))["strategy"]


# The soft prompt that learned (the demo's summaries: ROUGE-L 0.129 against few-shot prompting's 0.073, where
# prompt tuning and P-tuning stayed below zero-shot prompting): prefix tuning through its MLP, 32 virtual tokens.
LEARNED_SOFT_PROMPT = {"method": "prefix_tuning", "prefix_projection": True, "num_virtual_tokens": 32, "learning_rate": 1e-2}


def _lr(strategy: str) -> str:
    return STRATEGIES[strategy].learning_rates


def _epochs(n: int) -> int:
    return 5 if n < 100 else 3 if n < 10_000 else 1


def advise(s: Situation, compare_json: Path | None = None) -> Advice:
    """The recommendation for a situation; measured comparison results outrank the rules, unless no strategy
    measured beat the model-free baseline (then the rules answer, and say what was measured)."""
    measured = read_json(compare_json) if compare_json is not None else None
    if measured is not None:
        pick = measured.get("recommended")  # a field, never parsed from the sentence
        if pick:
            return Advice(pick, {}, f"{measured['recommendation']} (from {compare_json}, on similar data; a "
                          "measured comparison outranks the rules)", "measured")
        if measured.get("recommendation"):
            ruled = _by_rules(s)
            return Advice(ruled.strategy, ruled.settings, f"{ruled.reasons} (From {compare_json}: "
                          f"{measured['recommendation']})", ruled.rule)
    return _by_rules(s)


def _by_rules(s: Situation) -> Advice:
    n, retention = s.num_examples, s.retention
    figures = f"{n:,} examples ({s.target_tokens:,} target tokens), {s.task.replace('_', ' ')}"
    if n < 8:
        return Advice("prompting", {"num_shots": min(n, 4)},
                      f"With {figures}, there is too little labeled data to train on: use the examples as few-shot "
                      "demonstrations of a discrete template (tuning-free prompting).", "1")
    if not s.fits.get("full", True):
        mem = f"full tuning needs {s.memory_gib.get('full', 0):.1f} GiB, the device has {s.device_gib:.0f} GiB"
        if s.fits.get("lora", True):
            return Advice("lora", {"rank": 16, "alpha": 32, "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                          f"{mem}; LoRA needs {s.memory_gib.get('lora', 0):.1f} GiB and trains "
                          f"{100 * s.trainable_share.get('lora', 0):.2g}% of the parameters. {figures}.", "2")
        q = s.quantized_lora
        if q is not None and q.fits:
            return Advice("lora", {"rank": 16, "alpha": 32, "quantize": "nf4", "double_quant": True,
                                   "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                          f"{mem}; LoRA over the unquantized base needs {s.memory_gib.get('lora', 0):.1f} GiB, but "
                          f"over a 4-bit NF4 base (QLoRA, double quantization) {q.memory_gib:.1f} GiB, at about "
                          f"{q.slowdown:.2f}x LoRA's step time (every 4-bit weight is dequantized in each forward and "
                          f"backward). {figures}.", "2")
        if not s.fits.get("soft_prompt", True):
            return Advice("lora", {"rank": 16, "alpha": 32, "distributed.strategy": "fsdp2",
                                   "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                          f"{mem}, and no strategy fits one device (LoRA needs {s.memory_gib.get('lora', 0):.1f} GiB, "
                          f"a soft prompt {s.memory_gib.get('soft_prompt', 0):.1f} GiB, mostly the frozen weights): "
                          "shard LoRA's model over several GPUs with FSDP2 (the plan's 'to fit' lines give the "
                          f"count). {figures}.", "2")
        # prompt tuning: a prefix's MLP would add layers x 2 x kv width x hidden parameters (1.1B on a 7B Llama),
        # and a prefix cannot go with activation checkpointing (its keys and values live in the KV cache)
        return Advice("soft_prompt", {"method": "prompt_tuning", "num_virtual_tokens": 32,
                                      "learning_rate": LEARNED_SOFT_PROMPT["learning_rate"],
                                      "activation_checkpointing": True},
                      f"{mem}, and LoRA does not fit either; a soft prompt trains only the prompt "
                      "(turn on train.activation_checkpointing).", "2")
    if n < 100:
        if retention == "low":  # full tuning fits here: rule 2 answered where it does not
            return Advice("full", {"learning_rate": _lr("full"), "epochs": _epochs(n)},
                          f"With {figures} and low retention, full tuning learns the most even from few examples "
                          "(measured: the demo's 64-example comparison), at the cost of general text.", "3")
        return Advice("lora", {"rank": 16, "alpha": 32, "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                      f"With {figures} and {retention} retention, a LoRA adapter "
                      f"({100 * s.trainable_share.get('lora', 0):.2g}% of the parameters) learns the task, and "
                      "detached it leaves the base model exactly as it was (measured on 64 examples: it learned "
                      "four times what a soft prompt did, and both are the base exactly with the adaptation off).",
                      "3")
    if n < 10_000 or not s.large_budget:
        if retention == "low" and s.fits.get("full", True) and s.large_budget and s.epochs >= 1:
            return Advice("full", {"learning_rate": _lr("full"), "epochs": _epochs(n)},
                          f"With {figures}, low retention and room for it ({s.memory_gib.get('full', 0):.1f} GiB of "
                          f"{s.device_gib:.0f}), full fine-tuning learns the most.", "4")
        rank = 8 if retention == "high" else 16
        short = (f" The planned steps see {s.epochs:.2g} of an epoch: in under one, full tuning at its usual rate "
                 "learned far less than LoRA (measured on SmolLM2-135M, banking77: accuracy 0.07 against 0.32)."
                 if retention == "low" and s.epochs < 1 else "")
        return Advice("lora", {"rank": rank, "alpha": 2 * rank, "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                      f"With {figures} and {retention} retention, LoRA rank {rank} "
                      f"({100 * s.trainable_share.get('lora', 0):.2g}% of the parameters) learns the task while "
                      "forgetting less than full tuning." + short, "4")
    if retention == "high":
        return Advice("lora", {"rank": 64, "alpha": 128, "learning_rate": _lr("lora"), "epochs": _epochs(n)},
                      f"With {figures} but high retention, a high-rank LoRA (64) uses the data while leaving the "
                      "base weights untouched.", "5")
    pick = "prompt_lm" if s.task == "long_generation" else "full"
    return Advice(pick, {"learning_rate": _lr(pick), "epochs": _epochs(n)},
                  f"With {figures} and a large budget (full tuning fits: {s.memory_gib.get('full', 0):.1f} GiB of "
                  f"{s.device_gib:.0f}), {STRATEGIES[pick].prose_name} tuning uses all of the data.",
                  "5")


def rules_against_measurement(situation: Situation, rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The advisor's rules alone (no measured comparison given) set against what a measured table supports, at each
    retention level: {"levels": {level: {rule, ruled, measured, agrees}}, "agrees": all of them}."""
    levels = {}
    for retention in ("high", "medium", "low"):
        ruled = advise(replace(situation, retention=retention))
        measured = measured_pick(rows, metric, retention)
        levels[retention] = {"rule": ruled.rule, "ruled": ruled.strategy, "measured": measured,
                             "agrees": ruled.strategy == measured}
    return {"levels": levels, "agrees": all(v["agrees"] for v in levels.values())}
