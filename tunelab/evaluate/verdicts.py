"""Verdicts as data: each figure of the diff with its value, the threshold that judged it, a level that code
reads (`ok`, `warning`, `bad`) and the sentence that reports and the CLI show. Code decides on `level` and
`figure`, never on the wording."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# general-text forgetting: tuned / base perplexity below PPL_MILD is no measurable forgetting, below PPL_STRONG mild
PPL_MILD, PPL_STRONG = 1.05, 1.25


def retained_perplexity_ratio(row: dict[str, Any]) -> float:
    """A comparison row's forgetting as the strategy is used: with the adaptation off where it comes off (soft
    prompts, adapters: the base stays available), else with it on."""
    off = row.get("perplexity_ratio_off")
    return row["perplexity_ratio"] if off is None else off

LEVELS = ("ok", "warning", "bad")


@dataclass(frozen=True)
class Verdict:
    figure: str  # what was measured, e.g. "general-text perplexity"
    value: float
    threshold: Any  # a number, a pair of cuts, or the rule in words
    level: str  # one of LEVELS
    text: str  # the sentence shown to people

    def as_dict(self) -> dict[str, Any]:
        assert self.level in LEVELS, self.level
        return asdict(self)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def graded(value: float, cuts: tuple[float, float], words: tuple[str, str, str], figure: str,
           unit: str) -> dict[str, Any]:
    """Below the first cut ok, below the second warning, else bad; the text is 'word: figure value (thresholds
    ...)', where `unit` places a number, e.g. 'x{}' or '{} nats per token'."""
    low, high = cuts
    k = 0 if value < low else 1 if value < high else 2
    text = f"{words[k]}: {figure} {unit.format(_number(value))} (thresholds {unit.format(low)} and {unit.format(high)})"
    return Verdict(figure, value, [low, high], LEVELS[k], text).as_dict()


def judged(figure: str, value: float, threshold: Any, bad: bool, text: str, level_if_bad: str = "bad") -> dict[str, Any]:
    """A two-way verdict: `level_if_bad` when `bad`, else ok."""
    return Verdict(figure, value, threshold, level_if_bad if bad else "ok", text).as_dict()


def verdict_text(verdict: Any) -> str:
    """The sentence of a verdict (a plain string in diff.json files written before verdicts were data)."""
    return verdict["text"] if isinstance(verdict, dict) else str(verdict)


def verdict_level(verdict: Any) -> str | None:
    return verdict.get("level") if isinstance(verdict, dict) else None
