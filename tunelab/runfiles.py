"""The files of a run directory: their names and layout, and typed readers of what a run wrote.

This is the one module that names a run's files; every stage that reads or places one asks here.
It sits on the low floor (the standard library; PyYAML for config.yaml, imported when read), so that
evaluate, report, doctor and the CLI read runs without importing train/.

A run directory (`output_dir`):
    config.yaml      the resolved config the run trained with
    metrics.jsonl    one JSON row per event, each with a "type": params, data, train, eval, summary
    samples.jsonl    greedy predictions on fixed prompts during training
    checkpoints/     step-N/ folders
    final/           the model as the strategy saves it: a Hugging Face folder, a peft adapter folder, or
                     base/ (the tuned LM) beside adapter/ (prompt+LM tuning)
    diff.json        `tunelab diff` (and compare) against the base
    eval.json        `tunelab eval --output` where a user keeps it beside the run
A comparison writes compare.json and its config.yaml into OUTPUT_DIR-compare/, one run directory per
strategy inside it.

JSON has no NaN or infinity: metrics.jsonl holds them as the strings "nan", "inf", "-inf"
(`encode_number`); `decode_number` reads them back, and `read_metrics` applies it to every row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
CONFIG = "config.yaml"
DIFF = "diff.json"
EVAL = "eval.json"
COMPARE = "compare.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"
FINAL_BASE = "base"  # prompt+LM tuning: final/base holds the tuned LM ...
FINAL_ADAPTER = "adapter"  # ... and final/adapter the soft prompt over it
ADAPTER_CONFIG = "adapter_config.json"  # peft's own name for an adapter folder's config
COMPARE_SUFFIX = "-compare"

# the strings the writer puts in place of non-finite floats, and the spellings the decoder also accepts
# (Python's json module writes NaN/Infinity bare; a row written by hand may spell them so)
_NON_FINITE = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}


def encode_number(value: Any) -> Any:
    """A metric value as JSON can hold it: a non-finite float becomes its string ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def decode_number(value: Any) -> Any:
    """The inverse of `encode_number`: those strings (any case, "Infinity" too) become floats again."""
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return float(value)
    return value


@dataclass(frozen=True)
class RunFiles:
    """Where each file of one run directory lives."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def diff(self) -> Path:
        return self.root / DIFF

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def compare(self) -> Path:
        return self.root / COMPARE

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def final_tokenizer_dir(self) -> Path:
        """The folder of final/ that holds the tokenizer: final/adapter for prompt+LM tuning, else final/."""
        adapter = self.final / FINAL_ADAPTER
        return adapter if adapter.is_dir() else self.final


def compare_dir(output_dir: str | Path) -> Path:
    """Where `tunelab compare` of a config writes by default: beside its output_dir, named OUTPUT_DIR-compare."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + COMPARE_SUFFIX)


def compare_of(output_dir: str | Path) -> Path:
    """The compare.json a comparison of this config's data writes by default (what `tunelab plan` reads)."""
    return compare_dir(output_dir) / COMPARE


# ---- metrics.jsonl ----------------------------------------------------------------------------------------------

def _parse(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file exactly as written (non-finite numbers still strings); a last line cut short
    (a killed run, a full disk) is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    last = _parse(lines[-1]) if lines else None
    return rows + ([last] if last is not None else [])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, with non-finite numbers decoded back to floats."""
    return [{key: decode_number(value) for key, value in row.items()} for row in read_rows(path)]


@dataclass(frozen=True)
class MetricRows:
    """A run's metric rows, selected by their "type"."""

    rows: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        """Every row of one kind ("params", "data", "train", "eval", "summary"), in the order written."""
        return [r for r in self.rows if r.get("type") == kind]

    def first(self, kind: str) -> dict[str, Any] | None:
        """The first row of one kind; None when the run wrote none."""
        return next((r for r in self.rows if r.get("type") == kind), None)


def run_metrics(run_dir: str | Path) -> MetricRows:
    """The metric rows of a run directory; none when it has no metrics.jsonl."""
    path = RunFiles(run_dir).metrics
    return MetricRows(read_metrics(path) if path.is_file() else [])


# ---- results: eval.json, diff.json, compare.json ----------------------------------------------------------------

def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON result file (eval, diff, compare); None when it is absent."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write a JSON result (a diff, a comparison) as every tunelab result file is written: indented."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=2))
    return path


def read_diff(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's diff against its base (`tunelab diff`), None when it has none."""
    return read_json(RunFiles(run_dir).diff)


def read_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """The eval summary kept in the run directory (eval.json), None when it has none."""
    return read_json(RunFiles(run_dir).eval)


def read_compare(folder: str | Path) -> dict[str, Any] | None:
    """The comparison a folder holds (compare.json, as `tunelab compare` writes it), None when it holds none."""
    return read_json(RunFiles(folder).compare)


def write_compare(folder: str | Path, result: dict[str, Any], config_text: str) -> Path:
    """A comparison's compare.json and the config it ran (config.yaml) in its folder; returns compare.json."""
    files = RunFiles(folder)
    files.config.write_text(config_text)
    return write_json(files.compare, result)


# ---- what a run saved -------------------------------------------------------------------------------------------

def is_run_dir(path: str | Path) -> bool:
    """A tunelab run directory: it holds the config it ran with."""
    return RunFiles(path).config.is_file()


def read_config_tree(run_dir: str | Path) -> dict[str, Any]:
    """The config a run wrote (config.yaml) as a plain tree; config.validate_config types it."""
    import yaml

    return yaml.safe_load(RunFiles(run_dir).config.read_text()) or {}


def run_of_saved(folder: str | Path) -> Path | None:
    """The run directory that wrote a saved model folder (its final/, final/adapter or final/base); None when the
    folder is not inside a run's final/."""
    folder = Path(folder).resolve()
    if folder.name == FINAL:
        candidates = [folder.parent]
    elif folder.parent.name == FINAL and folder.name in (FINAL_ADAPTER, FINAL_BASE):
        candidates = [folder.parent.parent]
    else:
        candidates = []
    return next((run for run in candidates if is_run_dir(run)), None)


def strategy_that_saved(folder: str | Path) -> str | None:
    """The strategy name of the run whose final/ holds `folder`, read from the config that run wrote; None for a
    folder no run saved."""
    run = run_of_saved(folder)
    return read_config_tree(run)["strategy"]["name"] if run is not None else None


def run_that_saved_adapter(adapter_dir: str | Path, base: str | Path) -> Path | None:
    """The run whose final/ an adapter belongs to, read from what it wrote: the adapter folder itself is in a run's
    final/, or the base it is loaded onto is (prompt+LM tuning's final/base, which its adapter config names)."""
    return run_of_saved(adapter_dir) or run_of_saved(base)
