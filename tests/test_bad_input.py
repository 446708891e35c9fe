"""Bad input gets one clear paragraph naming the file, line or key, exit code 2, and no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main


def _run_cli(tmp_path, capsys, tree, *args):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code = main(["train", str(cfg), *args])
    err = capsys.readouterr().err
    return code, err


def _tree(tmp_path, stories260k, rows=VARIED_ROWS, name="train.jsonl", **sections):
    return config_tree(stories260k, write_jsonl(tmp_path / name, rows), tmp_path / "run", **sections)


def _expect_error(tmp_path, capsys, tree, *patterns, args=()):
    code, err = _run_cli(tmp_path, capsys, tree, *args)
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert len(error_lines) == 1, err
    for pattern in patterns:
        assert pattern in error_lines[0], error_lines[0]
    return error_lines[0]


def test_malformed_jsonl_line(tmp_path, stories260k, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a" "completion": " b"}\n')
    tree = config_tree(stories260k, path, tmp_path / "run")
    _expect_error(tmp_path, capsys, tree, f"{path}:2", "not valid JSON")


def test_missing_and_misnamed_columns(tmp_path, stories260k, capsys):
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c"}]
    _expect_error(tmp_path, capsys, _tree(tmp_path, stories260k, rows), "train.jsonl:2", "no 'completion' field")
    rows = [{"question": "a", "answer": " b"}]
    _expect_error(tmp_path, capsys, _tree(tmp_path, stories260k, rows), "cannot tell the record shape",
                  "['answer', 'question']", "data.columns")
    tree = _tree(tmp_path, stories260k, rows, data={"columns": {"prompt": "question", "completion": "answr"}})
    _expect_error(tmp_path, capsys, tree, "completion <- answr", "['answer', 'question']")


def test_empty_target(tmp_path, stories260k, capsys):
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": "  "}]
    _expect_error(tmp_path, capsys, _tree(tmp_path, stories260k, rows), "train.jsonl:2", "'completion' is empty")


def test_target_empty_after_truncation(tmp_path, stories260k, capsys):
    rows = [{"prompt": "a long prompt " * 20, "completion": " b"}]
    tree = _tree(tmp_path, stories260k, rows, data={"max_length": 16, "truncation": "right"})
    _expect_error(tmp_path, capsys, tree, "train.jsonl:1", "no target token is left", "data.max_length")
    tree = _tree(tmp_path, stories260k, rows, data={"max_length": 16, "truncation": "error"})
    _expect_error(tmp_path, capsys, tree, "train.jsonl:1", "longer than data.max_length=16")


def test_missing_model_folder_and_weights(tmp_path, stories260k, capsys):
    tree = _tree(tmp_path, stories260k)
    tree["model"]["path"] = str(tmp_path / "no-such-model")
    _expect_error(tmp_path, capsys, tree, "no-such-model", "does not exist")
    broken = tmp_path / "broken-model"
    shutil.copytree(stories260k, broken)
    (broken / "model.safetensors").unlink()
    tree["model"]["path"] = str(broken)
    _expect_error(tmp_path, capsys, tree, "broken-model", "no weights file")


def test_pickle_weights_are_refused_unless_allowed(tmp_path, stories260k, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(stories260k, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    tree = _tree(tmp_path, stories260k)
    tree["model"]["path"] = str(pickled)
    _expect_error(tmp_path, capsys, tree, "pickle", "model.allow_pickle")
    tree["model"]["allow_pickle"] = True
    tree["train"]["max_steps"] = 1
    code, err = _run_cli(tmp_path, capsys, tree)
    assert code == 0, err


def test_unknown_key_and_wrong_type(tmp_path, stories260k, capsys):
    tree = _tree(tmp_path, stories260k)
    tree["train"]["learning_rat"] = 0.1
    _expect_error(tmp_path, capsys, tree, "unknown config key 'train.learning_rat'", "Did you mean 'train.learning_rate'")
    tree = _tree(tmp_path, stories260k)
    _expect_error(tmp_path, capsys, tree, "'train.max_steps' = 'ten'", "valid integer", args=["train.max_steps=ten"])
    _expect_error(tmp_path, capsys, tree, "unknown config key 'dat'", "Did you mean 'data'", args=["dat.max_length=3"])


def test_output_dir_with_another_run_is_not_clobbered(tmp_path, stories260k, capsys):
    tree = _tree(tmp_path, stories260k)
    code, err = _run_cli(tmp_path, capsys, tree)
    assert code == 0, err
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    tree["train"]["learning_rate"] = 0.5
    _expect_error(tmp_path, capsys, tree, "already holds a run", "--resume", "--overwrite")
    _expect_error(tmp_path, capsys, tree, "different config", "train.learning_rate", args=["--resume"])
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before  # nothing touched
    code, err = _run_cli(tmp_path, capsys, tree, "--overwrite")
    assert code == 0, err
    assert "learning_rate: 0.5" in (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    tree["output_dir"] = str(tmp_path / "other")
    _expect_error(tmp_path, capsys, tree, "not empty and holds no tunelab run")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: /nonexistent/model}\ndata: {train: x.jsonl}\ntrain: {max_steps: 1}\noutput_dir: o\n")
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model folder '/nonexistent/model' does not exist" in proc.stderr


def test_config_file_problems(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: {path: x\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("data.eval_fraction=1.5", "'data.eval_fraction' = 1.5"),
    ("train.epochs=2", "set only one of train.max_steps and train.epochs"),
    ("train.eval_every=5", "no eval data"),
])
def test_impossible_config(tmp_path, stories260k, capsys, override, message):
    _expect_error(tmp_path, capsys, _tree(tmp_path, stories260k), message, args=[override])
