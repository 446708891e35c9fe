"""`tunelab doctor RUN_DIR`: name what went wrong in a run, with the evidence and the correction.

Reads the run's metrics and, where present, its eval and diff results (tunelab.runfiles). Each finding says
what happened, the evidence (steps, numbers), why it matters, and what to change (config keys).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.verdicts import retained_perplexity_ratio, verdict_level, verdict_text
from tunelab.runfiles import METRICS, RunFiles, read_compare, read_diff, read_eval, run_metrics


@dataclass
class Diagnosis:
    what: str
    evidence: str
    why: str
    fix: str
    severity: str = "warning"  # "error" when the run's result cannot be used


def _nan(rows: list[dict[str, Any]]) -> list[Diagnosis]:
    for r in rows:
        if not math.isfinite(float(r["loss"])) or not math.isfinite(float(r["grad_norm"])):
            return [Diagnosis("training diverged: the loss or gradient became NaN/infinite",
                              f"step {r['step']}: loss {r['loss']}, grad norm {r['grad_norm']}",
                              "every update after this step is garbage; the final model is unusable",
                              "lower train.learning_rate (try 10x lower), keep train.max_grad_norm at 1.0, add "
                              "train.warmup_steps, and use train.precision: fp32 if bf16 overflows", "error")]
    return []


def _flat(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[Diagnosis]:
    """The loss barely moved: measured on the eval set when there is one (the same examples every
    time), else on the first and last fifths of the train steps (different examples each step)."""
    if len(train) < 20:
        return []
    if len(evals) >= 2:
        first, last, where, limit = evals[0]["eval_loss"], evals[-1]["eval_loss"], "eval loss", 0.01
    else:
        fifth = max(2, len(train) // 5)
        first = statistics.fmean(float(r["loss"]) for r in train[:fifth])
        last = statistics.fmean(float(r["loss"]) for r in train[-fifth:])
        where, limit = "mean train loss of the first and last fifths", 0.02
    change = abs(last - first) / max(abs(first), 1e-9)
    if change >= limit:
        return []
    return [Diagnosis("learning rate too low: the loss stayed flat",
                      f"{where} {first:.4f} -> {last:.4f} ({100 * change:.2f}% change over {len(train)} steps; "
                      f"threshold {100 * limit:g}%)", "the weights barely moved: the run learned nothing",
                      "raise train.learning_rate (10x or more; adapters and soft prompts need higher rates than "
                      "full tuning)")]


def _divergence_and_lr(rows: list[dict[str, Any]]) -> list[Diagnosis]:
    losses = [float(r["loss"]) for r in rows]
    if len(losses) < 5 or not all(map(math.isfinite, losses)):
        return []
    first, n = losses[0], len(losses)
    early = losses[1 : max(2, n // 5) + 1]
    out = []
    if max(early) > 1.2 * first:
        k = rows[1 + early.index(max(early))]["step"]
        out.append(Diagnosis("learning rate too high: the loss rose early", f"loss {first:.3f} at step {rows[0]['step']} "
                             f"rose to {max(early):.3f} by step {k}", "a too-large step overshoots; the run wastes its "
                             "budget recovering or diverges", "lower train.learning_rate (3-10x) or add train.warmup_steps"))
    tail = losses[-max(2, n // 5):]
    if statistics.fmean(tail) > 1.5 * min(losses) and statistics.fmean(tail) > first:
        out.append(Diagnosis("training diverged: the loss ended above where it started",
                             f"loss {first:.3f} at the start, {min(losses):.3f} at best, {statistics.fmean(tail):.3f} over "
                             "the last fifth of the steps", "the final weights are worse than the initial ones",
                             "lower train.learning_rate; keep train.max_grad_norm: 1.0", "error"))
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    flips = sum((a > 0) != (b > 0) for a, b in zip(diffs, diffs[1:]))
    amplitude = statistics.fmean(abs(d) for d in diffs) / max(statistics.fmean(losses), 1e-9)
    if n >= 20 and flips > 0.8 * (n - 2) and amplitude > 0.25:
        out.append(Diagnosis("learning rate too high: the loss oscillates", f"{flips} of {n - 2} steps reverse "
                             f"direction, moving {100 * amplitude:.0f}% of the loss each step", "the optimizer "
                             "bounces across the minimum instead of settling", "lower train.learning_rate or raise "
                             "the batch (train.batch_size, train.grad_accum or train.tokens_per_step)"))
    return out


def _spikes_and_gradients(rows: list[dict[str, Any]]) -> list[Diagnosis]:
    losses = [float(r["loss"]) for r in rows]
    norms = [float(r["grad_norm"]) for r in rows]
    out = []
    if not all(map(math.isfinite, losses + norms)):
        return out
    spikes = [rows[i]["step"] for i in range(5, len(losses))
              if losses[i] > 3 * statistics.median(losses[max(0, i - 10) : i])]
    if spikes:
        out.append(Diagnosis("loss spikes", f"the loss jumped above 3x its recent median at steps {spikes[:10]}",
                             "spikes undo progress and often precede divergence",
                             "lower train.learning_rate, keep train.max_grad_norm: 1.0, check those steps' data"))
    jumps = [(norms[i] / max(statistics.median(norms[i - 10 : i]), 1e-12), i) for i in range(10, len(norms))]
    ratio, i = max(jumps) if jumps else (0.0, 0)
    if ratio > 20:
        k, median = rows[i]["step"], statistics.median(norms[i - 10 : i])
        out.append(Diagnosis("exploding gradient norm", f"grad norm {norms[i]:.3g} at step {k}, {ratio:.0f}x the median "
                             f"{median:.3g} of the 10 steps before (threshold: 20x)",
                             "one huge update can wreck the weights", "keep train.max_grad_norm (1.0) and lower "
                             "train.learning_rate"))
    tail = norms[-max(1, len(norms) // 10):]
    if norms and max(tail) < 1e-7:
        out.append(Diagnosis("vanishing gradient", f"grad norm below 1e-7 over the last {len(tail)} steps",
                             "nothing trains", "check that the strategy trains something and the loss has target "
                             "tokens; raise train.learning_rate"))
    return out


def _overfitting(train: list[dict[str, Any]], evals: list[dict[str, Any]], run_dir: Path) -> list[Diagnosis]:
    if len(evals) < 3:
        return []
    losses = [e["eval_loss"] for e in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    if best == len(losses) - 1 or losses[-1] < 1.05 * losses[best]:
        return []
    best_step = evals[best]["step"]
    train_at = [float(r["loss"]) for r in train if r["step"] <= best_step] or [float(train[0]["loss"])]
    train_end = statistics.fmean(float(r["loss"]) for r in train[-max(1, len(train) // 10):])
    if train_end >= statistics.fmean(train_at[-max(1, len(train_at) // 10):]):
        return []
    checkpoints = RunFiles(run_dir).checkpoints
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else []
    nearest = min(saved, key=lambda s: abs(s - best_step)) if saved else None
    return [Diagnosis("overfitting: the eval loss rose while the train loss kept falling",
                      f"eval loss {losses[best]:.4f} at step {best_step} (the best), {losses[-1]:.4f} at step "
                      f"{evals[-1]['step']}; train loss {train_end:.4f} at the end",
                      "the model memorises the training examples and gets worse on new ones",
                      f"use the model of step {best_step}"
                      + (f" (the nearest saved checkpoint is checkpoints/step-{nearest})" if nearest else "")
                      + "; set train.max_steps near that step, add data, or tune fewer parameters "
                        "(strategy.name: lora or soft_prompt)")]


def _underfitting(train: list[dict[str, Any]]) -> list[Diagnosis]:
    losses = [float(r["loss"]) for r in train]
    if len(losses) < 20:
        return []
    fifth = max(2, len(losses) // 5)
    before, last = statistics.fmean(losses[-2 * fifth : -fifth]), statistics.fmean(losses[-fifth:])
    if last < 0.95 * before and before - last > 0.01 * losses[0]:  # still falling, and by a meaningful amount
        return [Diagnosis("underfitting: the loss was still falling when training stopped",
                          f"mean loss {before:.4f} -> {last:.4f} over the last two fifths of the steps",
                          "more steps would still improve the model", "raise train.max_steps (or train.epochs)")]
    return []


def _label_mask(train: list[dict[str, Any]], data_row: dict[str, Any] | None) -> list[Diagnosis]:
    out = []
    share = sum(r["num_label_tokens"] for r in train) / max(1, sum(r["num_tokens"] for r in train))
    if train and share < 0.03:
        out.append(Diagnosis("very few trained tokens per example", f"{100 * share:.2f}% of the tokens carry a label",
                             "the loss sees almost nothing of the targets; check the template and data.format",
                             "check the data with `tunelab data check`; make sure targets are not empty"))
    if data_row and data_row.get("targets_truncated"):
        n, total = data_row["targets_truncated"], data_row["num_examples"]
        out.append(Diagnosis("targets truncated", f"{n} of {total} targets were cut by data.max_length",
                             "a cut target loses its end and its EOS: the model learns to stop in the middle",
                             "raise data.max_length, or data.truncation: drop"))
    return out


def _from_results(run_dir: Path) -> list[Diagnosis]:
    out = []
    d, e = read_diff(run_dir), read_eval(run_dir)
    eos = d["drift"]["eos_share_tuned"] if d else e.get("eos_rate") if e else None
    if eos is not None and eos == 0:
        out.append(Diagnosis("the tuned model never emits EOS", "0% of its generations ended with EOS",
                             "outputs run to max_new_tokens: slow, and rambling past the answer",
                             "make targets end with EOS (`tunelab data check` lists those that do not); do not let "
                             "data.max_length cut targets; train longer", "error"))
    if d and verdict_level(d["drift"]["collapse_verdict"]) == "bad":
        out.append(Diagnosis("format collapse", verdict_text(d["drift"]["collapse_verdict"]), "the model answers everything "
                             "in the task's format, even unrelated prompts", "tune fewer parameters (strategy.name: "
                             "lora or soft_prompt), fewer steps, or mix general examples into data.train"))
    if d and "bad" in (verdict_level(d["forgetting"]["perplexity_verdict"]),
                       verdict_level(d["forgetting"]["kl_verdict"])):
        out.append(_forgetting_finding(d["forgetting"], run_dir))
    return out


def _forgetting_finding(f: dict[str, Any], run_dir: Path) -> Diagnosis:
    """A forgetting verdict of the diff, read as the strategy is used: a detachable adaptation whose base is kept
    with it off only shifts the adapted model; otherwise forgetting, with what forgot less in the same comparison."""
    off = f.get("adaptation_off")
    if off and verdict_level(off["verdict"]) == "ok":  # the base is kept: only the adapted model shifts
        return Diagnosis("general text shifts with the adaptation on",
                         f"{verdict_text(f['perplexity_verdict'])}; with it off: {verdict_text(off['verdict'])}",
                         "the adaptation steers every input towards the task; the base weights are untouched, so "
                         "with it off the model is the base",
                         "serve general requests with the adaptation off (peft's disable_adapter, or the base model "
                         "alone) and task requests with it on")
    measured = ""
    compare = read_compare(run_dir.parent)  # a run of a comparison sits in the comparison's folder
    if compare is not None:
        rows = compare["table"]
        kept = {r["strategy"]: retained_perplexity_ratio(r) for r in rows if r["strategy"] != run_dir.name}
        less = sorted((name for name, ratio in kept.items() if ratio < f["perplexity_ratio"]), key=kept.get)
        detached = {r["strategy"] for r in rows if r.get("perplexity_ratio_off") is not None}
        if less:
            measured = "; measured here, these forgot less: " + ", ".join(
                f"{name} (x{kept[name]:.2f}{' with the adaptation off' if name in detached else ''})" for name in less)
    return Diagnosis("forgetting above the threshold",
                     f"{verdict_text(f['perplexity_verdict'])}; {verdict_text(f['kl_verdict'])}",
                     "the model lost part of what it knew before tuning",
                     "tune fewer parameters (strategy.name: lora, whose adapter detaches, with a small "
                     "strategy.lora.rank), lower train.learning_rate or train.max_steps" + measured)


def diagnose(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not RunFiles(run_dir).metrics.is_file():
        raise TunelabError(f"'{run_dir}' has no {METRICS}: it is not a tunelab run directory.")
    rows = run_metrics(run_dir)
    train, evals, data_row = rows.of("train"), rows.of("eval"), rows.first("data")
    found = _nan(train)
    if not found:  # after a NaN nothing else is meaningful
        found += _divergence_and_lr(train) + _flat(train, evals) + _spikes_and_gradients(train)
        found += _overfitting(train, evals, run_dir)
        found += _underfitting(train) if not any("overfitting" in f.what for f in found) else []
    found += _label_mask(train, data_row) + _from_results(run_dir)
    return {"run_dir": str(run_dir), "steps": len(train), "healthy": not found,
            "findings": [asdict(f) for f in found],
            "summary": "clean bill of health: no pathology found" if not found else f"{len(found)} finding(s)"}
