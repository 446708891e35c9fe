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
    cfg = validate_config(_tree(tmp_path, stories260k, "run"))
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses, acc = _scalars(tmp_path / "run", "train/loss")
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["type"] == "train"]
    evals, _ = _scalars(tmp_path / "run", "eval/eval_loss")
    assert evals == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in rows if r["type"] == "eval"]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert "summary/peak_memory_bytes" in acc.Tags()["scalars"]
    assert "config" in "".join(acc.Tags()["tensors"])  # add_text stores a text tensor


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
