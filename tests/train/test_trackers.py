"""train.report_to: every metrics.jsonl row reaches the tracker, read back with the tracker's own reader."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.train.loop import train
from tunelab.train.metrics import read_metrics


def _tree(tmp_path, stories260k, name, **train_section):
    return config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / name,
                       data={"eval": str(write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[:4]))},
                       train={"max_steps": 4, "eval_every": 2, "report_to": ["tensorboard"], **train_section})


def _scalars(run_dir, tag):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def test_tensorboard_holds_every_row_and_the_config(tmp_path, stories260k):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = validate_config(_tree(tmp_path, stories260k, "run", sample_every=2, num_samples=2, sample_tokens=4))
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses, acc = _scalars(tmp_path / "run", "train/loss")
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["type"] == "train"]
    evals, _ = _scalars(tmp_path / "run", "eval/eval_loss")
    assert evals == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in rows if r["type"] == "eval"]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert "summary/peak_memory_bytes" in acc.Tags()["scalars"]
    tensors = acc.Tags()["tensors"]  # add_text stores text as tensors: the config, and the samples at each step
    assert any(t.startswith("config") for t in tensors)
    sample_tag = next(t for t in tensors if t.startswith("samples"))
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(sample_tag)}
    first = read_metrics(tmp_path / "run" / "samples.jsonl")[0]
    assert sorted(texts) == [0, 2, 4] and first["reference"] in texts[0] and "| prediction |" in texts[0]


def test_a_resumed_run_logs_each_step_once(tmp_path, stories260k):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    tree = _tree(tmp_path, stories260k, "run", save_every=2, stop_after=3)  # step 3 is logged, then lost
    train(validate_config(tree))
    tree["train"]["stop_after"] = None
    tree["resume"] = True
    train(validate_config(tree))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses, _ = _scalars(tmp_path / "run", "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["type"] == "train"]


def test_a_missing_tracker_library_is_a_clear_error(tmp_path, stories260k, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tmp_path, stories260k, "run")))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tunelab[tensorboard]'" in err and "Traceback" not in err


@pytest.mark.parametrize("strategy", ["full", "soft_prompt"])
def test_sample_predictions_during_training(tmp_path, stories260k, strategy):
    """samples.jsonl: the same held-out prompts at step 0, every sample_every steps and at the end, each prediction
    what greedy generation from the model of that step gives (checked at the end against the final model)."""
    from tunelab.evaluate.generate import generate
    from tunelab.evaluate.loaders import load_for_eval

    tree = _tree(tmp_path, stories260k, "run", sample_every=2, num_samples=3, sample_tokens=6, report_to=[])
    tree["strategy"] = {"name": strategy}
    cfg = validate_config(tree)
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in rows] == [(s, i) for s in (0, 2, 4) for i in range(3)]
    evals = VARIED_ROWS[:4]
    for r in rows:
        assert r["prompt"] == evals[r["index"]]["prompt"] and r["reference"] == evals[r["index"]]["completion"].strip()
    em = load_for_eval(cfg.output_dir)
    final = generate(em, [evals[i]["prompt"] for i in range(3)], 6)
    assert [r["prediction"] for r in rows if r["step"] == 4] == [g.text.strip() for g in final]
    base = generate(load_for_eval(str(stories260k)), [evals[0]["prompt"]], 6)[0].text.strip()
    from tunelab.report.run_report import report_run

    html = report_run(tmp_path / "run").read_text()  # the report shows them side by side, step by step
    assert "Sample predictions" in html and "step 0" in html and "step 4" in html
    if strategy == "full":  # step 0 is the untrained model (a soft prompt starts with its initial virtual tokens)
        assert rows[0]["prediction"] == base
