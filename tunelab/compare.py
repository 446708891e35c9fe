"""`tunelab compare`: the same data, step budget and seed under several strategies, each trained,
evaluated and diffed against the base model, in one table."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import Config, dump_config
from tunelab.errors import TunelabError
from tunelab.evaluate.baselines import bar
from tunelab.evaluate.diff import diff, reference_texts
from tunelab.evaluate.loaders import load_for_eval
from tunelab.evaluate.run import eval_data_from_config, evaluate
from tunelab.evaluate.verdicts import retained_perplexity_ratio
from tunelab.plan.advisor import LEARNED_SOFT_PROMPT
from tunelab.runfiles import RunFiles, run_metrics, write_compare, write_json
from tunelab.strategies.registry import resolve
from tunelab.train.child import train_in_child

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComparePreset:
    """A ready comparison: how much of the training data it keeps, the strategies it runs, and their settings
    (dotted.key=value per strategy label, under any the command line gives)."""

    name: str
    max_examples: int | None
    strategies: tuple[str, ...]
    overrides: dict[str, tuple[str, ...]]
    about: str


# the soft prompt that learned (tunelab.plan.advisor.LEARNED_SOFT_PROMPT), as compare settings
SOFT_PROMPT_SETTINGS = tuple(f"{'train' if k == 'learning_rate' else 'strategy.soft_prompt'}.{k}="
                             f"{str(v).lower() if isinstance(v, bool) else v}" for k, v in LEARNED_SOFT_PROMPT.items())
PRESETS = {
    "small-data": ComparePreset(
        "small-data", 64,
        ("zero-shot=prompting", "few-shot=prompting", "soft_prompt", "lora", "ia3", "freeze", "full", "prompt_lm"),
        {"few-shot": ("strategy.num_shots=2",), "soft_prompt": SOFT_PROMPT_SETTINGS,
         "freeze": ("strategy.freeze.trainable_layers=2",)},
        "64 labeled examples (a seeded sample of the training data), every strategy on the same budget: task score, "
        "trainable parameters, compute (FLOPs, seconds) and forgetting with the adaptation on and off"),
}


def apply_preset(cfg: Config, preset: ComparePreset, overrides: dict[str, list[str]]) -> tuple[Config, list[str],
                                                                                             dict[str, list[str]]]:
    """(the config with the preset's share of the data, its strategies, its per-strategy settings under the
    caller's)."""
    share = {} if preset.max_examples is None else {"data.max_examples": preset.max_examples}
    merged = {label: [*preset.overrides.get(label, ()), *overrides.get(label, [])]
              for label in {*preset.overrides, *overrides}}
    return (cfg.for_strategy(cfg.strategy.name, share, f"compare preset {preset.name}"), list(preset.strategies),
            merged)


def strategy_configs(cfg: Config, strategies: list[str], out_dir: Path,
                     overrides: dict[str, list[str]] | None = None) -> dict[str, Config]:
    """One validated config per strategy (all checked before anything trains). `overrides` holds
    dotted.key=value settings for single strategies (e.g. a learning rate that suits adapters)."""
    configs = {}
    for entry in strategies:
        label, _, name = entry.rpartition("=")  # "few-shot=prompting": a labelled variant of a strategy
        label = label or name
        run = [("output_dir", str(out_dir / label)), ("overwrite", True), ("resume", False)]
        configs[label] = cfg.for_strategy(name, [*run, *(overrides or {}).get(label, [])], f"compare, strategy {label}")
    return configs


def _train_strategy(cfg: Config, work: Path) -> float:
    """Train in a child process, so that its peak memory is its own (tunelab.train.child); returns the wall time.
    Prompting trains nothing (its run only records the rendering): that runs here, without a child."""
    path = work / f"{Path(cfg.output_dir).name}.yaml"
    path.write_text(dump_config(cfg))
    t0 = time.perf_counter()
    if not resolve(cfg.strategy).trains_anything:
        from tunelab.train.loop import train

        train(cfg)
        return time.perf_counter() - t0
    code, last_line = train_in_child(path, path.with_suffix(".log"))
    if code != 0:
        raise TunelabError(f"strategy {cfg.strategy.name} failed: {last_line} (its output: {path.with_suffix('.log')})")
    return time.perf_counter() - t0


# how a comparison ranks forgetting (said in compare.json, the report and every recommendation)
RANKED_BY = ("forgetting ranked by general-text perplexity with the adaptation off for soft prompts and adapters, "
             "whose base weights are untouched, and with it on for strategies that change the base weights")


@dataclass
class CompareRow:
    """One strategy's line of the comparison. compare.json's table holds `as_dict()`: these names, with each task
    metric under its own name in place of `metrics` (the report and the CLI put words on them)."""

    strategy: str
    trainable_params: int
    share_trained: float
    wall_time_s: float
    peak_memory_mib: float | None  # None: the run shared this process (prompting), no training memory of its own
    tokens_per_s: float | None
    train_loss: float | None
    eval_loss: float | None
    learning_rate: float
    train_flops: float | None = None  # the plan's FLOPs formula for this run's budget (0 for prompting)
    metrics: dict[str, float] = field(default_factory=dict)
    perplexity_ratio: float = 1.0  # tuned / base perplexity on the general reference text, adaptation on
    kl_base_to_tuned: float = 0.0  # nats per token
    # the same with the adaptation taken off (soft prompts, adapters: the base is kept); None where it cannot come off
    perplexity_ratio_off: float | None = None
    kl_base_to_tuned_off: float | None = None
    eos_share: float | None = None
    task_format_share: float | None = None
    probes_right: int | None = None
    probes_right_base: int | None = None
    probes_right_off: int | None = None

    @property
    def retained_perplexity_ratio(self) -> float:
        """The forgetting figure a comparison ranks by (tunelab.evaluate.verdicts.retained_perplexity_ratio)."""
        return retained_perplexity_ratio(asdict(self))

    def as_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        metrics = fields.pop("metrics")
        head = list(fields)[: list(fields).index("train_flops") + 1]
        return {**{k: fields[k] for k in head}, **metrics, **{k: v for k, v in fields.items() if k not in head}}


def _flops_per_config(cfg: Config, configs: dict[str, Config]) -> dict[str, float]:
    """Each strategy's training FLOPs for its budget, by the plan's formula on the real training data's shape (the
    tokens of the examples: a soft prompt's virtual tokens are not counted)."""
    from tunelab.plan.estimate import flops, model_shape, workload
    from tunelab.plan.run import load_train_data

    shape, data = model_shape(cfg.model.path, cfg.model.trust_remote_code), load_train_data(cfg)[0]
    return {name: flops(shape, workload(scfg, data), data, scfg) for name, scfg in configs.items()}


def run_row(name: str, cfg: Config, seconds: float) -> CompareRow:
    rows = run_metrics(cfg.output_dir)
    params = rows.first("params")
    train, evals, summary = rows.of("train"), rows.of("eval"), rows.first("summary") or {}
    return CompareRow(name, params["trainable_params"], params["trainable_share"], seconds,
                      summary.get("peak_memory_bytes", 0) / 2**20,
                      (sum(r["num_tokens"] for r in train) / sum(r["seconds"] for r in train)) if train else None,
                      train[-1]["loss"] if train else None, evals[-1]["eval_loss"] if evals else None,
                      cfg.train.learning_rate)


def _with_diff(row: CompareRow, d: dict[str, Any]) -> CompareRow:
    """The row with its diff's figures: the task metrics, forgetting (on, and off where it comes off), drift and
    probes."""
    f = d["forgetting"]
    row.metrics, row.perplexity_ratio, row.kl_base_to_tuned = d["task"]["tuned"], f["perplexity_ratio"], \
        f["kl_base_to_tuned"]
    row.eos_share, row.task_format_share = d["drift"]["eos_share_tuned"], d["drift"]["format_collapse_tuned"]
    if "adaptation_off" in f:
        off = f["adaptation_off"]
        row.perplexity_ratio_off, row.kl_base_to_tuned_off = off["perplexity_ratio"], off["kl_base_to_tuned"]
        row.probes_right_off = off.get("probes_right")
    if "probes" in d:
        row.probes_right, row.probes_right_base = d["probes"]["right_tuned"], d["probes"]["right_base"]
    return row


def compare(cfg: Config, strategies: list[str], out_dir: Path,
            overrides: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Train, evaluate (cfg.eval) and diff (cfg.diff) each strategy; write out_dir/compare.json and the report."""
    eval_settings, diff_settings = cfg.eval, cfg.diff
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = strategy_configs(cfg, strategies, out_dir, overrides)
    flops_of = _flops_per_config(cfg, configs)
    data = eval_data_from_config(cfg, eval_settings.max_examples)
    base = load_for_eval(cfg.model.path, device=eval_settings.device, precision=eval_settings.precision)
    reference = reference_texts(base, diff_settings)
    base_eval = None
    base_cache: dict[str, Any] = {}
    table: list[CompareRow] = []
    for name, scfg in configs.items():
        log.info("compare: strategy %s", name)
        seconds = _train_strategy(scfg, out_dir)
        row = run_row(name, scfg, seconds)
        row.train_flops = flops_of[name]
        tuned = load_for_eval(scfg.output_dir, device=eval_settings.device, precision=eval_settings.precision)
        if base_eval is None:
            base_eval = evaluate(base, data, eval_settings)[0]
        if not resolve(scfg.strategy).trains_anything:  # the weights are the base's: nothing to forget
            row.peak_memory_mib = None  # its run shared this process: no training memory of its own
            task_data = eval_data_from_config(scfg, eval_settings.max_examples)
            # the base's weights on the base's rendering of the same examples: its evaluation is the base's
            same_as_base = (task_data.spec, task_data.data_cfg, task_data.path) == (data.spec, data.data_cfg, data.path)
            row.metrics = base_eval["metrics"] if same_as_base else evaluate(tuned, task_data, eval_settings)[0]["metrics"]
            table.append(row)
            continue
        d = diff(base, tuned, data, diff_settings, eval_settings, reference=reference, base_eval=base_eval,
                 base_cache=base_cache)
        write_json(RunFiles(scfg.output_dir).diff, d)
        table.append(_with_diff(row, d))
    base_probes = next((r.probes_right_base for r in table if r.probes_right_base is not None), None)
    for row in table:
        if not resolve(configs[row.strategy].strategy).trains_anything and base_probes is not None:
            row.probes_right = base_probes  # it runs the base's weights
    metric = next(iter(base_eval["metrics"])) if base_eval else None
    no_model = base_eval["baselines"] if base_eval else None
    recommended, recommendation = measured_recommendation(table, metric, no_model)
    result = {"metric": metric, "base_metrics": base_eval["metrics"] if base_eval else None, "baselines": no_model,
              "table": [r.as_dict() for r in table], "eval_data": data.path, "num_eval_examples": len(data.examples),
              "reference": reference[1],
              "note": f"same data, seed and step budget for every strategy; task metric on {len(data.examples)} "
                      f"held-out examples of {data.path}; forgetting on {reference[1]}",
              "recommended": recommended, "recommendation": recommendation, "forgetting_ranked_by": RANKED_BY,
              "settings": {"eval": eval_settings.model_dump(mode="json"), "diff": diff_settings.model_dump(mode="json")}}
    write_compare(out_dir, result, yaml.safe_dump({"compare": strategies, **cfg.model_dump(mode="json")}))
    return result


def measured_recommendation(table: list[CompareRow], metric: str | None,
                            no_model: dict[str, dict[str, Any]] | None = None, tolerance: float = 0.02
                            ) -> tuple[str | None, str]:
    """(strategy, why): among the strategies that beat the strongest model-free baseline (`no_model`, e.g.
    always answering the majority label) and are within `tolerance` of the best task score, the one that
    forgot least; (None, why) when none beats that baseline."""
    if not metric or not table:
        return None, ""
    floor = bar(no_model, metric)
    beating = [r for r in table if floor is None or r.metrics[metric] > floor[1]]
    if not beating:
        best = max(table, key=lambda r: r.metrics[metric])
        return None, (f"measured: no strategy beats {floor[0]} ({metric} {floor[1]:.3f}, {no_model[floor[0]]['answer']}); "
                      f"the best, {best.strategy}, scored {best.metrics[metric]:.3f}: none is worth its cost on this "
                      "data.")
    best = max(r.metrics[metric] for r in beating)
    close = [r for r in beating if r.metrics[metric] >= best - tolerance]
    pick = min(close, key=lambda r: (r.retained_perplexity_ratio, -r.metrics[metric]))
    above = f"; above {floor[0]}'s {floor[1]:.3f}" if floor else ""
    off = " with its adaptation off" if pick.perplexity_ratio_off is not None else ""
    return pick.strategy, (
        f"measured: {pick.strategy} — {metric} {pick.metrics[metric]:.3f} (best {best:.3f}; strategies within "
        f"{tolerance} of the best count as tied{above}) with the least forgetting among them (general-text "
        f"perplexity x{pick.retained_perplexity_ratio:.3f}{off}; {RANKED_BY}).")
