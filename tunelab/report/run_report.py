"""`tunelab report RUN_DIR`: the training curves, and the eval, diff and compare results found there."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunelab.evaluate.baselines import describe
from tunelab.evaluate.verdicts import verdict_text
from tunelab.report import plots
from tunelab.report.page import Section, fmt, write_report
from tunelab.runfiles import (COMPARE, DIFF, EVAL, METRICS, MetricRows, RunFiles, read_compare, read_diff, read_eval,
                              read_rows, run_metrics)


def training_sections(rows: MetricRows) -> list[Section]:
    """The parameter count, the loss, learning-rate and gradient-norm curves and the eval table of a run's metrics
    (non-finite numbers already decoded by tunelab.runfiles)."""
    train, evals, params = rows.of("train"), rows.of("eval"), rows.first("params")
    sections = []
    if params:
        sections.append(Section("Parameters", text=[
            f"{params['trainable_params']:,} of {params['total_params']:,} parameters trained "
            f"({100 * params['trainable_share']:.4g}%)."]))
    if not train and not evals:
        return sections
    s = Section("Training")
    series = {}
    if train:
        series["train loss"] = ([r["step"] for r in train], [r["loss"] for r in train])
    if evals:
        series["eval loss"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    s.images.append(("loss per step (train: the step's target tokens; eval: the whole eval set)",
                     plots.line_plot(series, "loss", "step", "cross-entropy (nats/token)")))
    if train:
        steps = [r["step"] for r in train]
        s.images.append(("learning rate", plots.line_plot({"lr": (steps, [r["lr"] for r in train])},
                                                          "learning rate", "step", "lr")))
        s.images.append(("gradient norm before clipping",
                         plots.line_plot({"grad norm": (steps, [r["grad_norm"] for r in train])},
                                         "gradient norm", "step", "L2 norm", log_y=True)))
        last = train[-1]
        tps = sum(r["num_tokens"] for r in train) / max(1e-9, sum(r["seconds"] for r in train))
        s.text.append(f"{last['step']} steps; final train loss {last['loss']:.4f}; {tps:,.0f} tokens/s on average.")
        skipped = [r["step"] for r in train if r.get("skipped")]
        if skipped:
            s.verdicts.append(f"non-finite loss or gradient norm at step(s) {', '.join(map(str, skipped))}: "
                              "those updates were not applied (train.on_nonfinite).")
    if evals:
        s.table = [{"step": r["step"], "eval loss": r["eval_loss"], "eval perplexity": r["eval_perplexity"],
                    "token accuracy": r["eval_token_accuracy"]} for r in evals]
    sections.append(s)
    return sections


def eval_section(summary: dict[str, Any]) -> Section:
    s = Section(f"Evaluation: {summary['data']}", text=[
        f"{summary['num_examples']} examples, mode {summary['mode']}, model {summary['model']}."])
    s.table = [{"metric": k, "value": v} for k, v in summary["metrics"].items()]
    return s


def diff_sections(d: dict[str, Any]) -> list[Section]:
    out = []
    if "task" in d:
        t = d["task"]
        names = list(t["tuned"])
        s = Section("Task: base vs tuned", verdicts=[verdict_text(t["verdict"])])
        s.table = [{"metric": n, "base": t["base"][n], "tuned": t["tuned"][n]} for n in names]
        s.images.append(("task metrics before and after",
                         plots.bar_plot(names, {"base": [t["base"][n] for n in names],
                                                "tuned": [t["tuned"][n] for n in names]}, "task", "score")))
        out.append(s)
    f = d["forgetting"]
    off = f.get("adaptation_off")  # a soft prompt or an adapter: with it off, the model is the base's own
    on_label = "adaptation on" if off else "tuned"
    figures = [("perplexity", f["perplexity_base"], f["perplexity_tuned"], off and off["perplexity_tuned"]),
               ("KL(base || tuned) per token", 0.0, f["kl_base_to_tuned"], off and off["kl_base_to_tuned"])]
    forgetting = Section("Forgetting", text=[f"Reference text: {f['reference']}."],
                         verdicts=[verdict_text(f["perplexity_verdict"]), verdict_text(f["kl_verdict"])],
                         table=[{"figure": name, "base": b, on_label: t, **({"adaptation off": o} if off else {})}
                                for name, b, t, o in figures])
    if off:
        forgetting.text.append(f"The adaptation comes off (the base weights are untouched): both figures are shown, "
                               f"and comparisons rank by the {f['ranked_by']} one.")
        forgetting.verdicts.append(verdict_text(off["verdict"]))
    out.append(forgetting)
    if "probes" in d:
        p = d["probes"]
        out.append(Section("Probe questions", text=[p["rule"]], verdicts=[verdict_text(p["verdict"])],
                           table=[{"probes": p["num"], "right before": p["right_base"], "right after": p["right_tuned"]}]))
    dr = d["drift"]
    s = Section("Drift on unrelated prompts", text=[f"Prompts: {dr['prompts']}."],
                verdicts=[verdict_text(dr[k]) for k in ("length_verdict", "eos_verdict", "collapse_verdict")])
    s.table = [{"": "mean length", "base": dr["length_base"]["mean"], "tuned": dr["length_tuned"]["mean"]},
               {"": "ends with EOS", "base": dr["eos_share_base"], "tuned": dr["eos_share_tuned"]},
               {"": "task-format outputs", "base": dr["format_collapse_base"], "tuned": dr["format_collapse_tuned"]}]
    s.images.append(("output length and EOS before and after",
                     plots.bar_plot(["mean length / 10", "EOS share", "task format"],
                                    {"base": [dr["length_base"]["mean"] / 10, dr["eos_share_base"], dr["format_collapse_base"]],
                                     "tuned": [dr["length_tuned"]["mean"] / 10, dr["eos_share_tuned"],
                                               dr["format_collapse_tuned"]]}, "drift", "value")))
    out.append(s)
    out.append(Section("Examples", table=[{"prompt": e["prompt"], "base": e["base"][:80], "tuned": e["tuned"][:80]}
                                          for e in dr["examples"]]))
    return out


# the words for the fields of a comparison row (tunelab.compare.CompareRow); task metrics keep their names
COMPARE_LABELS = {"trainable_params": "trainable params", "share_trained": "share trained", "wall_time_s": "wall time s",
                  "peak_memory_mib": "peak memory MiB", "tokens_per_s": "tokens/s", "train_loss": "train loss",
                  "eval_loss": "eval loss", "learning_rate": "learning rate", "train_flops": "train FLOPs", "perplexity_ratio": "perplexity ratio",
                  "kl_base_to_tuned": "KL base->tuned", "eos_share": "EOS share",
                  "task_format_share": "task-format share", "probes_right": "probes right",
                  "probes_right_base": "probes right (base)", "perplexity_ratio_off": "perplexity ratio (off)",
                  "kl_base_to_tuned_off": "KL base->tuned (off)", "probes_right_off": "probes right (off)"}


# compare.json's columns of what a strategy cost to train (the report's second table)
COST_COLUMNS = ["strategy", "trainable_params", "share_trained", "wall_time_s", "peak_memory_mib", "tokens_per_s",
                "train_loss", "eval_loss", "learning_rate", "train_flops"]


def compare_table(rows: list[dict[str, Any]], columns: list[str], width: int = 14) -> str:
    """Comparison rows as a fixed-width table for a terminal: a header of words, then one line per strategy."""
    lines = ["  ".join(f"{COMPARE_LABELS.get(c, c):>{width}}" for c in columns)]
    lines += ["  ".join(f"{fmt(row.get(c)):>{width}}" for c in columns) for row in rows]
    return "\n".join(lines)


def compare_summary(result: dict[str, Any]) -> str:
    """What `tunelab compare` prints: the table's main columns, the model-free baselines, the recommendation and
    how forgetting was ranked."""
    columns = ["strategy", "trainable_params", "wall_time_s", "train_flops", "peak_memory_mib", "tokens_per_s",
               "eval_loss", result["metric"], "perplexity_ratio", "perplexity_ratio_off", "kl_base_to_tuned"]
    return "\n".join([compare_table(result["table"], columns), describe(result["baselines"]),
                      result["recommendation"], result["forgetting_ranked_by"]])


def labelled(row: dict[str, Any]) -> dict[str, Any]:
    """A comparison row with words for its field names, for tables people read."""
    return {COMPARE_LABELS.get(k, k): v for k, v in row.items()}


def _forgetting_bars(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Perplexity ratios with the adaptation on, and off where it comes off (no bar where it does not)."""
    bars = {"adaptation on": [r.get("perplexity_ratio") or 0.0 for r in rows]}
    if any(r.get("perplexity_ratio_off") is not None for r in rows):
        bars["adaptation off"] = [math.nan if r.get("perplexity_ratio_off") is None else r["perplexity_ratio_off"]
                                  for r in rows]
    return bars


def _strategy_map(rows: list[dict[str, Any]], metric: str, baselines: dict[str, dict[str, Any]] | None) -> str:
    """Each strategy's task score against its forgetting as it is used (off where the adaptation comes off)."""
    points = [plots.MapPoint(r["strategy"], r.get(metric) or 0.0,
                             r.get("perplexity_ratio_off") or r.get("perplexity_ratio") or 1.0,
                             r.get("trainable_params") or 0) for r in rows]
    lines = {name: b[metric] for name, b in (baselines or {}).items() if metric in b}
    return plots.strategy_map(points, lines, metric, "forgetting: tuned / base perplexity (log; off where it comes off)")


def compare_sections(c: dict[str, Any]) -> list[Section]:
    rows = c["table"]
    # two tables that each fit a page: what each strategy scored and changed, and what it cost
    cost = [k for k in COST_COLUMNS if k in rows[0]]
    s = Section("Strategy comparison", text=[t for t in (c.get("note", ""), describe(c.get("baselines")),
                                                         c.get("forgetting_ranked_by", "")) if t],
                table=[labelled({k: v for k, v in r.items() if k == "strategy" or k not in cost}) for r in rows])
    metric = c.get("metric")
    names = [r["strategy"] for r in rows]
    if metric:
        s.images.append((f"task {metric} per strategy",
                         plots.bar_plot(names, {metric: [r.get(metric) or 0.0 for r in rows]}, metric, metric)))
    if metric and any(r.get("perplexity_ratio") for r in rows):
        s.images.append(("strategy map: the task score against forgetting (with the adaptation off where it comes "
                         "off), marker size by trainable parameters, the model-free baselines as lines",
                         _strategy_map(rows, metric, c.get("baselines"))))
    if any(r.get("perplexity_ratio") for r in rows):
        s.images.append(("forgetting per strategy (tuned / base perplexity on general text; 1 = none; log scale)",
                         plots.bar_plot(names, _forgetting_bars(rows), "forgetting", "ratio", log_y=True)))
    if c.get("recommendation"):
        s.verdicts.append(c["recommendation"])
    return [s, Section("What each strategy cost", table=[labelled({k: r.get(k) for k in cost}) for r in rows])]


def samples_section(rows: list[dict[str, Any]]) -> Section:
    """One row per sampled prompt, one column per step: how the answers changed while training."""
    steps = sorted({r["step"] for r in rows})
    table: dict[int, dict[str, Any]] = {}
    for r in rows:
        entry = table.setdefault(r["index"], {"prompt": r["prompt"][-80:], "reference": r["reference"]})
        entry[f"step {r['step']}"] = r["prediction"]
    return Section("Sample predictions", text=[f"greedy predictions on {len(table)} fixed prompts at steps "
                                               f"{', '.join(map(str, steps))} (samples.jsonl)"],
                   table=[table[i] for i in sorted(table)])


def report_run(run_dir: Path, title: str | None = None) -> Path:
    """Write report.html and report.md into run_dir from whatever results it holds."""
    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    sections: list[Section] = []
    if files.metrics.is_file():
        sections += training_sections(run_metrics(run_dir))
    if files.samples.is_file() and (samples := read_rows(files.samples)):  # predictions: text, as written
        sections.append(samples_section(samples))
    for result, build in ((read_eval(run_dir), lambda d: [eval_section(d)]), (read_diff(run_dir), diff_sections),
                          (read_compare(run_dir), compare_sections)):
        if result is not None:
            sections += build(result)
    if not sections:
        from tunelab.errors import TunelabError

        raise TunelabError(f"'{run_dir}' holds no {METRICS}, {EVAL}, {DIFF} or {COMPARE} to report.")
    return write_report(run_dir, title or f"tunelab report: {run_dir.name}", sections)
