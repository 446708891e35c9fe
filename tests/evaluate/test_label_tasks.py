"""Classification written as prompt/completion (or chat) is scored as a label task when its targets form a closed
set of the training targets: accuracy and macro-F1 beside exact match, the majority and chance baselines, and
`--mode score` ranks the labels."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter

import pytest

from tests.conftest import config_tree, shared_file, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.data.records import Example
from tunelab.evaluate.labels import closed_label_set
from tunelab.train.loop import train

COLOURS = ("red", "blue", "green")
ROWS = [{"prompt": f"Tom saw a {c} {a}.\nColour:", "completion": f" {c}"} for c in COLOURS for a in
        ("ball", "car", "dog", "cat", "box", "hat", "cup", "bird")]


def _pc(prompt: str, completion: str, row: int) -> Example:
    return Example("prompt_completion", {"prompt": prompt, "completion": completion}, "x.jsonl", row)


def test_banking77_as_prompt_completion_is_a_closed_label_set():
    with shared_file("banking77/train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)  # the file is grouped by intent
    pool = [_pc(f"{r['text']}\nIntent:", f" {r['category']}", i) for i, r in enumerate(rows[:3000])]
    evals = [_pc(f"{r['text']}\nIntent:", f" {r['category']}", i) for i, r in enumerate(rows[3000:3300])]
    labels = closed_label_set(evals, pool)
    assert labels is not None and len(labels) == len({r["category"] for r in rows[:3000]}) == 77
    assert labels[0] == sorted(r["category"] for r in rows[:3000])[0]  # stripped, sorted


def test_free_text_and_unseen_targets_are_not_labels():
    summaries = [_pc(f"ticket {i}", f" summary number {i}", i) for i in range(50)]
    assert closed_label_set(summaries[40:], summaries[:40]) is None  # every target distinct: free text
    pool = [_pc("q", f" {c}", i) for i, c in enumerate(COLOURS * 4)]
    assert closed_label_set([_pc("q", " purple", 0)], pool) is None  # an eval target training never saw
    assert closed_label_set([_pc("q", " red ", 0)], pool) == sorted(COLOURS)  # surrounding space is not a label
    assert closed_label_set([_pc("q", " red", 0)], []) is None  # no training targets: nothing to close the set
    same = [_pc("q", " See you tomorrow.", i) for i in range(6)]
    assert closed_label_set(same[:1], same) is None  # one target every time: nothing to choose between


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, stories260k):
    tmp = tmp_path_factory.mktemp("colour_pc")
    tree = config_tree(stories260k, write_jsonl(tmp / "train.jsonl", ROWS), tmp / "run",
                       train={"max_steps": 30, "learning_rate": 3e-3, "batch_size": 6})
    cfg = validate_config(tree)
    train(cfg)
    write_jsonl(tmp / "eval.jsonl", ROWS[::4])
    return cfg, tmp


def _eval(run, tmp, *flags):
    code = main(["eval", run, str(tmp / "eval.jsonl"), "--output", str(tmp / "r.json"),
                 "--predictions", str(tmp / "p.jsonl"), *flags])
    assert code == 0
    preds = [json.loads(line) for line in (tmp / "p.jsonl").read_text().splitlines()]
    return json.loads((tmp / "r.json").read_text()), preds


def test_generated_labels_get_label_metrics_and_baselines(colour_run):
    cfg, tmp = colour_run
    summary, preds = _eval(cfg.output_dir, tmp, "--max-new-tokens", "4")
    assert summary["mode"] == "generate" and summary["label_task"] is True and summary["num_options"] == 3
    assert list(summary["metrics"]) == ["accuracy", "macro_f1", "exact_match"]  # accuracy leads (compare's metric)
    right = sum(p["prediction"].strip() == p["reference"].strip() for p in preds)  # counted here, independently
    assert summary["metrics"]["accuracy"] == pytest.approx(right / len(preds))
    assert set(summary["baselines"]) == {"majority", "chance", "copy the prompt"}
    refs = Counter(p["reference"] for p in preds)
    majority = summary["baselines"]["majority"]  # balanced training colours: the tie goes to "blue"
    assert majority["answer"] == "blue" and majority["accuracy"] == pytest.approx(refs["blue"] / len(preds))
    assert summary["baselines"]["copy the prompt"]["accuracy"] == 0.0


def test_mode_score_ranks_the_labels_of_prompt_completion_data(colour_run):
    cfg, tmp = colour_run
    summary, preds = _eval(cfg.output_dir, tmp, "--mode", "score")
    assert summary["mode"] == "score" and summary["num_options"] == 3 and summary["label_task"] is True
    assert {p["prediction"].strip() for p in preds} <= set(COLOURS)
    right = sum(p["prediction"].strip() == p["reference"].strip() for p in preds)
    assert summary["metrics"]["accuracy"] == pytest.approx(right / len(preds)) and right == len(preds)
    assert set(summary["baselines"]) == {"majority", "chance"}


def test_chat_label_data_is_scored_by_ranking_its_last_assistant_turn():
    from tunelab.data.records import Example as Ex
    from tunelab.evaluate.score import with_target

    ex = Ex("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]},
            "x.jsonl", 0)
    changed = with_target(ex, "blue")
    assert changed.target == "blue" and ex.target == "red"  # a copy: the original keeps its answer
    assert changed.fields["messages"][0] == ex.fields["messages"][0]
