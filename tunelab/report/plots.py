"""Plots as embedded PNG (base64), drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
              log_y: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def bar_plot(groups: list[str], bars: dict[str, list[float]], title: str, ylabel: str, log_y: bool = False) -> str:
    """Grouped bars; `log_y` for ratios that span orders of magnitude (one 10,000x bar would hide the rest)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / max(1, len(bars))
    for k, (name, values) in enumerate(bars.items()):
        xs = [i + k * width - 0.4 + width / 2 for i in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set(title=title, ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _png(fig)


@dataclass
class MapPoint:
    """One strategy on the strategy map."""

    name: str
    score: float  # the task metric
    forgetting: float  # tuned / base perplexity on general text (1 = none)
    trainable_params: int


def strategy_map(points: list[MapPoint], baselines: dict[str, float], metric: str, forgetting_label: str) -> str:
    """Task score against forgetting (log scale), marker area by trainable parameters (log scale: 1k to 100M
    parameters span a visible range), each model-free baseline as a horizontal line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    top = max((p.trainable_params for p in points), default=1) or 1
    for p in points:
        size = 30 + 400 * math.log10(1 + p.trainable_params) / math.log10(1 + top)
        ax.scatter([p.forgetting], [p.score], s=size, alpha=0.6)
        ax.annotate(p.name, (p.forgetting, p.score), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for k, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(k + 5) % 10}", label=f"{name} ({value:.3g})")
    ax.axvline(1.0, color="grey", linewidth=0.8)  # no forgetting
    ax.set_xscale("log")
    ax.set(title=f"strategy map: {metric} against forgetting (marker size: trainable parameters)",
           xlabel=forgetting_label, ylabel=metric)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    if baselines:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def histogram(data: dict[str, list[float]], title: str, xlabel: str, bins: int = 20) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, values in data.items():
        ax.hist(values, bins=bins, alpha=0.55, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend()
    return _png(fig)
