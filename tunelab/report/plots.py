"""Plots as embedded PNG (base64), drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

import base64
import io
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


def bar_plot(groups: list[str], bars: dict[str, list[float]], title: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / max(1, len(bars))
    for k, (name, values) in enumerate(bars.items()):
        xs = [i + k * width - 0.4 + width / 2 for i in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _png(fig)


def histogram(data: dict[str, list[float]], title: str, xlabel: str, bins: int = 20) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, values in data.items():
        ax.hist(values, bins=bins, alpha=0.55, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend()
    return _png(fig)
