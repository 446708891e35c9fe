"""Bad input gets one clear paragraph naming the file, line or key, exit code 2, and no traceback."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import VARIED_ROWS, config_tree, shared_file, write_jsonl
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


def test_prefix_tuning_with_activation_checkpointing_is_refused(tmp_path, stories260k, capsys):
    """The recomputation would extend the prefix's KV cache twice (a shape error deep in attention): refused."""
    _expect_error(tmp_path, capsys, _tree(tmp_path, stories260k), "turn train.activation_checkpointing off",
                  args=["strategy.name=soft_prompt", "strategy.soft_prompt.method=prefix_tuning",
                        "train.activation_checkpointing=true"])


def _cli(capsys, *argv):
    """`tunelab ARGV` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error(code, err, *patterns):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert len(lines) == 1, err
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


GOOD_LINES = {".jsonl": ['{"prompt": "a", "completion": " b"}', '{"prompt": "c", "completion": " d"}',
                         '{"prompt": "caf\udce9", "completion": " e"}'],
              ".json": ['[{"prompt": "a", "completion": " b"},', '{"prompt": "c", "completion": " d"},',
                        '{"prompt": "caf\udce9", "completion": " e"}]'],
              ".csv": ["prompt,completion", "a,b", "caf\udce9,e"],
              ".tsv": ["prompt\tcompletion", "a\tb", "caf\udce9\te"]}


@pytest.mark.parametrize("suffix", sorted(GOOD_LINES))
def test_invalid_utf8_names_the_line_and_byte(tmp_path, stories260k, capsys, suffix):
    # line 3 holds a Latin-1 "é" (byte 0xe9), as a file saved in the wrong encoding does
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes("\n".join(GOOD_LINES[suffix]).encode("utf-8", "surrogateescape") + b"\n")
    offset = path.read_bytes().index(b"\xe9")
    _expect_error(tmp_path, capsys, config_tree(stories260k, path, tmp_path / "run"),
                  f"{path}:3", f"byte offset {offset}", "0xe9", "UTF-8")


def test_random_bytes_in_train_data_check_and_eval(tmp_path, stories260k, capsys):
    path = tmp_path / "noise.jsonl"
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    _expect_error(tmp_path, capsys, config_tree(stories260k, path, tmp_path / "run"), f"{path}:", "UTF-8")
    _one_error(*_cli(capsys, "data", "check", path, "--model", stories260k)[::2], f"{path}:", "UTF-8")
    _one_error(*_cli(capsys, "eval", stories260k, path)[::2], f"{path}:", "UTF-8")


def test_truncated_weights_are_named_as_damaged(tmp_path, stories260k, capsys):
    broken = tmp_path / "cut-model"
    shutil.copytree(stories260k, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    tree = _tree(tmp_path, stories260k)
    tree["model"]["path"] = str(broken)
    _expect_error(tmp_path, capsys, tree, str(weights), "damaged or incomplete", "download the model again")
    _one_error(*_cli(capsys, "eval", broken, write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[:2]))[::2],
               str(weights), "damaged or incomplete")


def test_a_run_whose_final_weights_are_cut_is_named(tmp_path, stories260k, capsys):
    tree = _tree(tmp_path, stories260k, train={"max_steps": 1})
    code, err = _run_cli(tmp_path, capsys, tree)
    assert code == 0, err
    weights = tmp_path / "run" / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_error(*_cli(capsys, "eval", tmp_path / "run", tmp_path / "train.jsonl")[::2], str(weights),
               "damaged or incomplete")


@pytest.mark.parametrize("damage", ["cut", "no peft_type"])
def test_a_damaged_adapter_config_is_named(tmp_path, stories260k, capsys, damage):
    tree = _tree(tmp_path, stories260k, strategy={"name": "lora"}, train={"max_steps": 1})
    code, err = _run_cli(tmp_path, capsys, tree)
    assert code == 0, err
    config = tmp_path / "run" / "final" / "adapter_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2] if damage == "cut" else text.replace('"peft_type"', '"peft_kind"'))
    expected = "cannot be read as JSON" if damage == "cut" else "has no peft_type"
    for command in (["eval", tmp_path / "run", tmp_path / "train.jsonl"], ["eval", tmp_path / "run" / "final",
                                                                          tmp_path / "train.jsonl"],
                    ["export", tmp_path / "run", tmp_path / f"out-{damage}", "--merge"]):
        _one_error(*_cli(capsys, *command)[::2], str(config), expected)


def test_model_folder_without_tokenizer_files(tmp_path, stories260k, capsys):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(stories260k, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    tree = _tree(tmp_path, stories260k)
    tree["model"]["path"] = str(bare)
    line = _expect_error(tmp_path, capsys, tree, str(bare), "no tokenizer files", "tokenizer.json", "tokenizer.model")
    assert "sentencepiece" not in line


def test_eval_file_of_another_shape_is_refused(tmp_path, stories260k, capsys):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a story", "label": "happy"}] * 2)
    tree = _tree(tmp_path, stories260k, data={"eval": str(evals)})
    words = (str(evals), "text_label records (text, label)", str(tmp_path / "train.jsonl"),
             "prompt_completion records (prompt, completion)")
    _expect_error(tmp_path, capsys, tree, *words)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    _one_error(*_cli(capsys, "data", "check", tmp_path / "train.jsonl", "--model", stories260k,
                     "--eval", evals)[::2], *words)


def test_numbers_in_text_fields_are_refused(tmp_path, stories260k, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2], "label": [1.0, 0.0]}), path)
    _expect_error(tmp_path, capsys, config_tree(stories260k, path, tmp_path / "run"),
                  f"{path}:row 0", "field 'text'", "an integer (1)")
    pq.write_table(pa.table({"text": ["good film", "bad film"], "stars": [1.0, 0.0]}), path)
    tree = config_tree(stories260k, path, tmp_path / "run", data={"columns": {"label": "stars"}})
    _expect_error(tmp_path, capsys, tree, f"{path}:row 0", "field 'label' (column 'stars')", "a float (1.0)")


def test_output_paths_are_checked_before_the_work(tmp_path, stories260k, capsys):
    data = write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[:2])
    out = tmp_path / "new" / "deeper" / "results.json"
    code, _, err = _cli(capsys, "eval", stories260k, data, "--max-new-tokens", 2, "--output", out,
                        "--predictions", tmp_path / "preds" / "p.jsonl")
    assert code == 0, err
    assert json.loads(out.read_text())["num_examples"] == 2
    assert len((tmp_path / "preds" / "p.jsonl").read_text().splitlines()) == 2
    # refused before any model loads: the missing model would be the error otherwise
    _one_error(*_cli(capsys, "eval", tmp_path / "no-model", data, "--output", tmp_path / "new")[::2],
               f"--output '{tmp_path / 'new'}' is a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_error(*_cli(capsys, "eval", tmp_path / "no-model", data, "--predictions", blocker / "p.jsonl")[::2],
               f"--predictions '{blocker / 'p.jsonl'}'", f"cannot create its folder '{blocker}'")
    _one_error(*_cli(capsys, "data", "check", data, "--model", tmp_path / "no-model", "--fix",
                     blocker / "clean.jsonl")[::2], "--fix", "cannot create its folder")
    _one_error(*_cli(capsys, "doctor", tmp_path / "no-run", "--output", tmp_path)[::2], "--output", "is a folder")


def test_train_refuses_what_data_check_calls_blocking(tmp_path, stories260k, capsys):
    # GSM8K at max_length 64: every worked answer is longer, so every target loses its end and its EOS
    lines = shared_file("gsm8k/train.jsonl").read_text().splitlines()[:6]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    tree = config_tree(stories260k, tmp_path / "gsm8k.jsonl", tmp_path / "run",
                       data={"max_length": 64, "columns": {"prompt": "question", "completion": "answer"}})
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code, out, _ = _cli(capsys, "data", "check", cfg, "--preview", 0)
    assert code == 1 and "blocking: truncated" in out
    finding = next(line for line in out.splitlines() if line.startswith("[blocking] truncated:"))
    assert "every target is cut" in finding
    line = _expect_error(tmp_path, capsys, tree, str(tmp_path / "gsm8k.jsonl"), "tunelab data check")
    assert finding in line  # the same words
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data-check.html", "data-check.md"]  # no run began
    tree["data"]["max_length"] = 512  # long enough: the same data trains
    code, err = _run_cli(tmp_path, capsys, tree, "train.max_steps=1")
    assert code == 0, err
