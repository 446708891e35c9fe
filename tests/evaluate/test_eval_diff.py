"""`tunelab eval` and `tunelab diff` end to end on small runs of the real stories260K model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.config import DiffConfig, EvalConfig
from tunelab.evaluate.diff import diff
from tunelab.evaluate.loaders import load_for_eval
from tunelab.evaluate.run import eval_data_from_config, evaluate
from tunelab.train.loop import train

ROWS = [{"text": f"Tom saw a {c} {a}.", "label": c} for c in ("red", "blue", "green") for a in
        ("ball", "car", "dog", "cat", "box", "hat", "cup", "bird")]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, stories260k):
    tmp = tmp_path_factory.mktemp("colour")
    tree = config_tree(stories260k, write_jsonl(tmp / "train.jsonl", ROWS), tmp / "run",
                       data={"eval_fraction": 0.25},
                       strategy={"name": "full", "template": {"prompt": "{text}\nColour:", "target": " {label}"}},
                       train={"max_steps": 30, "learning_rate": 3e-3, "batch_size": 6})
    cfg = validate_config(tree)
    train(cfg)
    return cfg, tmp


def test_eval_of_a_run_directory_scores_the_labels(colour_run, capsys):
    cfg, tmp = colour_run
    write_jsonl(tmp / "eval.jsonl", ROWS[::4])
    code = main(["eval", cfg.output_dir, str(tmp / "eval.jsonl"), "--output", str(tmp / "r.json"),
                 "--predictions", str(tmp / "p.jsonl")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp / "r.json").read_text())
    assert summary["mode"] == "score" and summary["num_options"] == 3 and summary["num_examples"] == 6
    assert summary["rendering"]["template"]["prompt"] == "{text}\nColour:"
    assert summary["metrics"]["accuracy"] == 1.0  # the colour is in the input: the tuned model reads it off
    majority = summary["baselines"]["majority"]  # the training colours are balanced: the tie goes to "blue"
    assert majority["answer"] == "blue" and majority["accuracy"] == pytest.approx(2 / 6)
    assert summary["baselines"]["chance"]["accuracy"] < 0.6
    assert "model-free baselines: majority ('blue'" in capsys.readouterr().out
    preds = [json.loads(line) for line in (tmp / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and preds[0]["input"].endswith("\nColour:") and preds[0]["prediction"] in {"red", "blue", "green"}


def test_generation_mode_reports_eos_and_lengths(colour_run):
    cfg, _ = colour_run
    em = load_for_eval(cfg.output_dir)
    summary, rows = evaluate(em, eval_data_from_config(cfg), EvalConfig(mode="generate", max_new_tokens=8))
    assert summary["mode"] == "generate" and summary["eos_rate"] > 0.5
    # label data generated is scored as labels (evaluate/labels.py), exact match beside accuracy and macro-F1
    assert {"accuracy", "macro_f1", "exact_match"} == set(summary["metrics"])
    assert summary["metrics"]["exact_match"] == sum(r["correct"] for r in rows) / len(rows)


def test_prompting_baseline_goes_through_the_same_path(colour_run, stories260k, tmp_path):
    cfg, tmp = colour_run
    tree = cfg.model_dump(mode="json")
    tree["strategy"] = {"name": "prompting", "template": tree["strategy"]["template"], "num_shots": 2}
    tree["output_dir"] = str(tmp_path / "prompting")
    prompting = validate_config(tree)
    train(prompting)
    em = load_for_eval(prompting.output_dir)
    summary, rows = evaluate(em, eval_data_from_config(prompting), EvalConfig())
    assert summary["rendering"]["num_shots"] == 2
    assert all(r["input"].count("Colour:") == 3 for r in rows)  # two demonstrations, then the question
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0


def test_diff_against_itself_is_zero_and_against_the_tuned_model_is_not(colour_run, stories260k, tmp_path):
    cfg, _ = colour_run
    base, tuned = load_for_eval(str(stories260k)), load_for_eval(cfg.output_dir)
    settings = DiffConfig(num_samples=4, sample_tokens=48, max_new_tokens=16)
    same = diff(base, base, None, settings, EvalConfig())
    assert same["forgetting"]["kl_base_to_tuned"] == pytest.approx(0.0, abs=1e-6)
    assert same["forgetting"]["perplexity_ratio"] == pytest.approx(1.0)
    assert same["forgetting"]["perplexity_verdict"]["text"].startswith("no measurable forgetting")
    assert same["forgetting"]["perplexity_verdict"]["level"] == "ok" and same["forgetting"]["kl_verdict"]["level"] == "ok"
    probes = write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "Once upon a time, there was a little girl named",
                                                      "answer": "Lily"}])
    d = diff(base, tuned, eval_data_from_config(cfg), DiffConfig(probes=str(probes), num_samples=4, sample_tokens=48,
                                                                   max_new_tokens=16), EvalConfig())
    f = d["forgetting"]
    assert f["kl_base_to_tuned"] > 0.01 and f["perplexity_tuned"] != f["perplexity_base"]
    # each verdict names its figure, with the value it reports
    def shown(v):
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"

    assert f"general-text perplexity x{shown(f['perplexity_ratio'])} (thresholds x" in f["perplexity_verdict"]["text"]
    assert f"KL(base||tuned) {shown(f['kl_base_to_tuned'])} nats per token (thresholds " in f["kl_verdict"]["text"]
    assert f["perplexity_verdict"]["value"] == f["perplexity_ratio"] and f["perplexity_verdict"]["threshold"] == [1.05, 1.25]
    assert d["task"]["tuned"]["accuracy"] >= d["task"]["base"]["accuracy"]
    assert d["probes"]["right_base"] == 1  # the base model knows its heroine
    for key in ("length_verdict", "eos_verdict", "collapse_verdict"):
        assert "threshold" in d["drift"][key]["text"] and d["drift"][key]["level"] in ("ok", "warning", "bad")
    assert "adaptation_off" not in f and f["ranked_by"] == "adaptation on"  # full tuning changed the base weights


@pytest.mark.parametrize("strategy", [{"name": "lora"}, {"name": "soft_prompt", "soft_prompt": {"method": "prefix_tuning"}},
                                      {"name": "soft_prompt", "soft_prompt": {"method": "prompt_tuning"}}])
def test_diff_of_a_detachable_adaptation_reports_it_on_and_off(strategy, stories260k, tmp_path, capsys):
    """Soft prompts and adapters keep the base weights: the diff measures forgetting with the adaptation on and with
    it off (exactly the base: perplexity ratio 1, KL 0, the base's probe answers), ranks by the latter, and says so
    in diff.json, on the command line and in the report."""
    tree = config_tree(stories260k, write_jsonl(tmp_path / "train.jsonl", ROWS), tmp_path / "run",
                       strategy={**strategy, "template": {"prompt": "{text}\nColour:", "target": " {label}"}},
                       train={"max_steps": 8, "learning_rate": 3e-2, "batch_size": 6})
    train(validate_config(tree))
    probes = write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "Once upon a time, there was a little girl named",
                                                      "answer": "Lily"}])
    assert main(["diff", str(stories260k), str(tmp_path / "run"), "--probes", str(probes)]) == 0
    shown = capsys.readouterr().out
    d = json.loads((tmp_path / "run" / "diff.json").read_text())
    f, off = d["forgetting"], d["forgetting"]["adaptation_off"]
    assert f["kl_base_to_tuned"] > 0.01 and f["perplexity_ratio"] != 1.0  # on: the adaptation changes general text
    assert off["perplexity_ratio"] == 1.0 and off["kl_base_to_tuned"] == 0.0  # off: the base's, exactly
    assert off["probes_right"] == d["probes"]["right_base"] == 1
    assert f["ranked_by"] == "adaptation off" and off["verdict"]["text"].startswith("no measurable forgetting")
    assert "forgetting with the adaptation off: no measurable forgetting" in shown
    report = (tmp_path / "run" / "report.md").read_text()
    assert "adaptation off" in report and "rank by the adaptation off one" in report
