"""`tunelab demo`: the whole story on the built-in model and data, offline, in minutes.

A small general-purpose model (pre-trained by tunelab on a generated world: facts, arithmetic,
everyday text, products and customers) is adapted to a task it never saw: turning support tickets
into concise summaries. Tuning-free prompting (zero- and few-shot) is the baseline; soft prompt,
LoRA and full fine-tuning train on the same budget; each is evaluated on held-out tickets and diffed
against the base on what it knew (facts, arithmetic, general text); a second task labels each
ticket's intent and urgency. Then the comparison, the recommendation and the HTML report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.compare import compare
from tunelab.config import validate_config
from tunelab.demo_world.build import MODEL_DIR
from tunelab.demo_world.data import write_demo_data
from tunelab.report.page import Section, fmt, write_report
from tunelab.report.run_report import COMPARE_LABELS, compare_sections

SUMMARY_TEMPLATE = {"prompt": "Ticket: {prompt}\nSummary:", "target": " {completion}"}
TRIAGE_TEMPLATE = {"prompt": "Ticket: {prompt}\nIntent and urgency:", "target": " {completion}"}
LEARNING_RATES = {"soft_prompt": 3e-2, "lora": 5e-3, "full": 1e-3}
TOKENS_PER_STEP = 1024


def _config(data: dict[str, Path], task: str, out: Path, steps: int, max_eval: int) -> Any:
    summary = task == "summary"
    evaluation = ({"metrics": ["rouge_l", "exact_match"], "max_new_tokens": 40, "batch_size": 32} if summary else
                  {"mode": "score"})
    return validate_config({
        "model": {"path": str(MODEL_DIR)},
        "data": {"train": str(data[f"{task}_train"]), "eval": str(data[f"{task}_eval"]), "max_length": 192,
                 "max_eval_examples": max_eval},
        "strategy": {"template": SUMMARY_TEMPLATE if task == "summary" else TRIAGE_TEMPLATE,
                     "soft_prompt": {"num_virtual_tokens": 16, "init_text": "Summarise the support ticket."},
                     "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"max_steps": steps, "learning_rate": LEARNING_RATES["full"], "tokens_per_step": TOKENS_PER_STEP,
                  "warmup_steps": max(1, steps // 20), "seed": 0, "progress": False},
        "eval": {**evaluation, "max_examples": max_eval},
        "diff": {"reference_text": str(data["reference"]), "probes": str(data["probes"]), "max_new_tokens": 12},
        "output_dir": str(out / task),
    })


def _print_table(title: str, result: dict[str, Any], metric_names: list[str]) -> None:
    cols = ["strategy", "trainable_params", "wall_time_s", *metric_names, "perplexity_ratio", "probes_right"]
    print(f"\n{title}")
    print("  ".join(f"{COMPARE_LABELS.get(c, c):>16}" for c in cols))
    for row in result["table"]:
        print("  ".join(f"{fmt(row.get(c)):>16}" for c in cols))


DEFAULT_STEPS = 100


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, steps: int | None = None) -> dict[str, Any]:
    """Run the demo; returns the two comparisons and the report path. `steps` overrides the step budget of
    every trained strategy (default: 100; 10 with `quick`)."""
    t0 = time.perf_counter()
    data = write_demo_data(out / "data", n_train=400, n_eval=100)
    steps, max_eval = (steps or 10, 12) if quick else (steps or DEFAULT_STEPS, 60)
    print(f"tunelab demo: the built-in base model ({MODEL_DIR}, pre-trained by tunelab on a generated world; "
          f"`python -m tunelab.demo_world.build` rebuilds it); 400 labeled tickets, {max_eval} held out")
    strategies = ["zero-shot=prompting", "few-shot=prompting", "soft_prompt", "lora", "full"]
    if quick:
        strategies = ["zero-shot=prompting", "lora"]
    overrides = {name: [f"train.learning_rate={lr}"] for name, lr in LEARNING_RATES.items()}
    overrides["few-shot"] = ["strategy.num_shots=2", "data.max_length=400"]  # room for two demonstrations
    print(f"1-3. task 1, summaries: {', '.join(strategies)}; {steps} steps of {TOKENS_PER_STEP:,} tokens each")
    summary = compare(_config(data, "summary", out, steps, max_eval), strategies, out / "summary-compare", overrides)
    _print_table("Task 1: ticket -> concise summary (held-out tickets; forgetting on the base's general text "
                 "and 60 probes)", summary, ["rouge_l", "exact_match"])
    # the labels are a harder target for this small model: full tuning at a gentler rate learns some of
    # them in the budget; LoRA at 1e-3 stayed at chance and at 5e-3 collapsed (measured, see README)
    triage_strategies = ["few-shot=prompting", "full"]
    triage_overrides = {**overrides, "full": ["train.learning_rate=3e-4"]}
    triage = compare(_config(data, "triage", out, steps, max_eval), triage_strategies, out / "triage-compare",
                     triage_overrides)
    _print_table("Task 2: ticket -> intent and urgency (12 label options, ranked by likelihood)", triage,
                 ["accuracy", "macro_f1"])

    from tunelab.plan.run import plan

    advice = plan(_config(data, "summary", out, steps, max_eval), "cpu",
                  compare_json=out / "summary-compare" / "compare.json").advice
    print(f"\n4. recommendation: {advice.strategy}. {advice.reasons}")
    sections = [Section("The story", text=[__doc__.split("\n\n")[1].replace("\n", " ")])]
    sections += [Section(f"Task 1 ({s.title})", s.text, s.verdicts, s.table, s.images) for s in compare_sections(summary)]
    sections += [Section(f"Task 2 ({s.title})", s.text, s.verdicts, s.table, s.images) for s in compare_sections(triage)]
    sections.append(Section("Recommendation", text=[f"{advice.strategy}: {advice.reasons}"]))
    report = write_report(out, "tunelab demo", sections)
    seconds = time.perf_counter() - t0
    print(f"report: {report}\n(the demo took {seconds:.0f} s)")
    (out / "demo.json").write_text(json.dumps({"summary": summary, "triage": triage, "seconds": seconds,
                                               "recommendation": advice.strategy}, indent=2))
    return {"summary": summary, "triage": triage, "report": report, "seconds": seconds}
