"""data.streaming: the same batches as the map-style path where the order is the same (a buffer that holds the
whole file), exact resume from the saved stream position (JSONL from its byte offset, CSV by skipping), and the
settings that need the whole file refused."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import VARIED_ROWS, config_tree, crash_after_saving, write_jsonl
from tunelab.config import validate_config
from tunelab.errors import ConfigError
from tunelab.train import loop
from tunelab.runfiles import read_metrics

PADDED = {"train": {"max_steps": 6, "batch_size": 4}}
PACKED = {"data": {"max_length": 192}, "train": {"max_steps": 4, "tokens_per_step": 768,
                                                 "tokens_per_micro_batch": 384}}


def _run(tmp_path, model, name, train_file, streaming, buffer=1000, resume=False, **sections):
    sections = {k: dict(v) for k, v in sections.items()}
    sections.setdefault("data", {}).update({"streaming": streaming, "shuffle_buffer": buffer})
    cfg = validate_config(config_tree(model, train_file, tmp_path / name, resume=resume, **sections))
    return loop.train(cfg)


def _rows(result):
    return [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]


@pytest.mark.parametrize("sections", [PADDED, PACKED], ids=["padded", "packed"])
def test_a_whole_file_buffer_streams_the_map_style_batches(tmp_path, stories260k, sections):
    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    mapped = _rows(_run(tmp_path, stories260k, "mapped", data, False, **sections))
    streamed = _rows(_run(tmp_path, stories260k, "streamed", data, True, **sections))
    for field in ("loss", "num_tokens", "num_label_tokens", "grad_norm"):
        assert [r[field] for r in streamed] == [r[field] for r in mapped], field


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_streamed_run_resumes_exactly_mid_file(tmp_path, stories260k, monkeypatch, suffix):
    """Buffers of 5 records over 24: the crash comes in the middle of the file, inside a buffer."""
    if suffix == "jsonl":
        data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    else:
        data = tmp_path / "d.csv"
        with data.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(VARIED_ROWS)
    sections = {"train": {"max_steps": 8, "batch_size": 3, "save_every": 3}}
    whole = _run(tmp_path, stories260k, "whole", data, True, buffer=5, **sections)
    restore = crash_after_saving(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, stories260k, "resumed", data, True, buffer=5, **sections)
    restore()
    resumed = _run(tmp_path, stories260k, "resumed", data, True, buffer=5, resume=True, **sections)
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in _rows(whole)]
    assert [r["num_tokens"] for r in _rows(resumed)] == [r["num_tokens"] for r in _rows(whole)]
    weights = load_file(str(whole.final_dir / "model.safetensors"))
    assert all(torch.equal(x, load_file(str(resumed.final_dir / "model.safetensors"))[k]) for k, x in weights.items())


def test_settings_that_need_the_whole_file_are_refused(tmp_path, stories260k):
    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    for sections in ({"train": {"epochs": 1, "max_steps": None}}, {"data": {"eval_fraction": 0.2}},
                     {"data": {"max_examples": 10}}):
        sections = {k: dict(v) for k, v in sections.items()}
        sections.setdefault("data", {})["streaming"] = True
        with pytest.raises(ConfigError, match="data.streaming reads the training file once"):
            validate_config(config_tree(stories260k, data, tmp_path / "run", **sections))
