"""Scores that need no model: what a task score must beat before it means anything.

Label tasks: always answering the training data's most common label (majority), and a label drawn
uniformly at random (chance: the mean over 20 seeded draws). Generation tasks: answering with the
prompt's own text (copy the prompt)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from tunelab.data.records import Example
from tunelab.evaluate.metrics import compute

CHANCE_DRAWS = 20


def prompt_text(ex: Example) -> str:
    """The user-written input of an example, without any template: what 'copy the prompt' answers."""
    if ex.shape == "chat":
        users = [m["content"] for m in ex.fields["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    if ex.shape == "instruction":
        return "\n".join(p for p in (ex.fields["instruction"], ex.fields.get("input") or "") if p)
    return ex.fields.get("prompt", ex.fields.get("text", ""))


def label_baselines(metrics: list[str], examples: list[Example], pool: list[Example], options: list[str],
                    references: list[str], seed: int = 0) -> dict[str, dict[str, Any]]:
    """The majority label of the training data (of the eval data without any) and a uniformly random label."""
    n = len(references)
    labels = [ex.target.strip() for ex in (pool or examples)]
    counts = Counter(labels)
    majority = min(counts, key=lambda label: (-counts[label], label))  # ties: the first in sorted order
    where = "the training labels" if pool else "the eval labels (no training data given)"
    rng = random.Random(seed)
    draws = [compute(metrics, [rng.choice(options).strip() for _ in range(n)], references) for _ in range(CHANCE_DRAWS)]
    return {"majority": {"answer": majority, "source": f"most common of {where} ({counts[majority]} of {len(labels)})",
                         **compute(metrics, [majority] * n, references)},
            "chance": {"answer": f"one of {len(options)} labels at random",
                       "source": f"mean of {CHANCE_DRAWS} seeded draws",
                       **{m: sum(d[m] for d in draws) / CHANCE_DRAWS for m in metrics}}}


def baselines(mode: str, metrics: list[str], examples: list[Example], pool: list[Example], options: list[str],
              references: list[str], seed: int = 0) -> dict[str, dict[str, Any]]:
    """name -> {"answer": what it answers, "source": where that came from, metric: score} on `references`: the label
    baselines where there are label `options` (ranked, or a closed label set generated), and for generation the
    prompt copied."""
    found = label_baselines(metrics, examples, pool, options, references, seed) if options else {}
    if mode == "score":
        return found
    return {**found, "copy the prompt": {"answer": "the example's own prompt text", "source": "the eval examples",
                                         **compute(metrics, [prompt_text(ex) for ex in examples], references)}}


def bar(result_baselines: dict[str, dict[str, Any]] | None, metric: str) -> tuple[str, float] | None:
    """The baseline a strategy must beat on `metric` (the strongest one), as (name, score)."""
    scored = [(name, b[metric]) for name, b in (result_baselines or {}).items() if metric in b]
    return max(scored, key=lambda nb: nb[1]) if scored else None


def describe(result_baselines: dict[str, dict[str, Any]] | None) -> str:
    """One line: each baseline with what it answers and its scores."""
    parts = []
    for name, b in (result_baselines or {}).items():
        scores = ", ".join(f"{k} {v:.4f}" for k, v in b.items() if k not in ("answer", "source"))
        parts.append(f"{name} ({b['answer']!r}; {b['source']}): {scores}" if name == "majority"
                     else f"{name} ({b['answer']}): {scores}")
    return "model-free baselines: " + "; ".join(parts) if parts else ""
