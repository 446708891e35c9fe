"""(IA)^3 (Liu et al. 2022, peft's IA3Config), added as one registry entry: it trains, plans, evaluates, diffs,
exports and appears in `compare` through the commands a user runs."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.models.load import load_model, load_tokenizer
from tunelab.strategies.model import count_parameters
from tunelab.strategies.prepare import prepare_strategy
from tunelab.runfiles import read_metrics

ROWS = [{"text": f"Tom saw a {c} {a}.", "label": c} for c in ("red", "blue", "green") for a in
        ("ball", "car", "dog", "cat", "box", "hat", "cup", "bird")]


@pytest.fixture(scope="module")
def ia3_run(tmp_path_factory, stories260k):
    tmp = tmp_path_factory.mktemp("ia3")
    tree = config_tree(stories260k, write_jsonl(tmp / "train.jsonl", ROWS), tmp / "run",
                       data={"eval_fraction": 0.25},
                       strategy={"name": "ia3", "template": {"prompt": "{text}\nColour:", "target": " {label}"}},
                       train={"max_steps": 30, "learning_rate": 3e-2, "batch_size": 6, "eval_every": 30})
    (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp / "c.yaml")]) == 0
    return tmp, validate_config(tree)


def test_ia3_trains_only_its_scales_and_learns(ia3_run):
    tmp, cfg = ia3_run
    rows = read_metrics(tmp / "run" / "metrics.jsonl")
    params = rows[0]
    built = count_parameters(prepare_strategy(load_model(cfg.model), cfg.strategy, load_tokenizer(cfg.model)))
    # stories260K (llama, hidden 64, kv 32, ffn 172, 5 layers): k_proj and v_proj outputs (32 each) and down_proj's
    # input (172) per layer
    assert params["trainable_params"] == built.trainable == 5 * (32 + 32 + 172)
    assert params["total_params"] == built.total
    evals = [r["eval_loss"] for r in rows if r["type"] == "eval"]
    assert evals[-1] < 0.8 * evals[0]  # the held-out loss falls well below the untuned model's
    adapter = json.loads((tmp / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "IA3" and set(adapter["feedforward_modules"]) == {"down_proj"}


def test_ia3_plans_with_its_exact_count(ia3_run, capsys):
    tmp, cfg = ia3_run
    assert main(["plan", str(tmp / "c.yaml"), "--output", str(tmp / "plan.json")]) == 0
    plan = json.loads((tmp / "plan.json").read_text())
    trained = read_metrics(tmp / "run" / "metrics.jsonl")[0]["trainable_params"]
    assert plan["configured_strategy"] == "ia3" and plan["strategies"]["ia3"]["trainable_params"] == trained
    assert plan["strategies"]["ia3"]["adapter_bytes"] == 4 * trained
    assert "ia3" in capsys.readouterr().out


def test_ia3_evaluates_diffs_and_merges(ia3_run, stories260k, capsys):
    tmp, cfg = ia3_run
    write_jsonl(tmp / "eval.jsonl", ROWS[::4])
    assert main(["eval", str(tmp / "run"), str(tmp / "eval.jsonl"), "--output", str(tmp / "r.json")]) == 0
    summary = json.loads((tmp / "r.json").read_text())
    assert summary["mode"] == "score" and summary["num_examples"] == 6 and 0 <= summary["metrics"]["accuracy"] <= 1
    assert main(["diff", str(stories260k), str(tmp / "run"), "--data", str(tmp / "eval.jsonl")]) == 0
    d = json.loads((tmp / "run" / "diff.json").read_text())
    assert d["forgetting"]["kl_base_to_tuned"] > 0  # the scales changed the model
    assert main(["export", str(tmp / "run"), str(tmp / "merged"), "--merge"]) == 0
    assert "merged" in capsys.readouterr().out
    assert (tmp / "merged" / "config.json").is_file() and not (tmp / "merged" / "adapter_config.json").exists()


def test_ia3_appears_in_compare(ia3_run, capsys):
    tmp, cfg = ia3_run
    assert main(["compare", str(tmp / "c.yaml"), "--strategies", "prompting,ia3", "--out", str(tmp / "cmp"),
                 "train.max_steps=10"]) == 0, capsys.readouterr().err
    table = json.loads((tmp / "cmp" / "compare.json").read_text())["table"]
    row = next(r for r in table if r["strategy"] == "ia3")
    assert row["trainable_params"] == read_metrics(tmp / "run" / "metrics.jsonl")[0]["trainable_params"]
