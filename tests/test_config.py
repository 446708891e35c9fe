"""Config: YAML plus dotted overrides, validated, with helpful errors."""

from __future__ import annotations

import pytest
import yaml

from tunelab.config import dump_config, load_config, parse_override
from tunelab.errors import ConfigError

BASE = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"max_steps": 3}, "output_dir": "o"}


def _write(tmp_path, tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.max_steps=50", "train.learning_rate=1e-4",
                                               "data.columns={label: category}", 'strategy.template="Q: {text}"',
                                               "train.precision=bf16", "train.max_grad_norm=null"])
    assert cfg.train.max_steps == 50 and cfg.train.learning_rate == 1e-4
    assert cfg.data.columns == {"label": "category"}
    assert cfg.strategy.template.prompt == "Q: {text}" and cfg.strategy.template.target == "{target}"
    assert cfg.train.precision == "bf16" and cfg.train.max_grad_norm is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    again = load_config(_write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "Did you mean 'train.max_steps'"),
    ("train.batch_size=0", "'train.batch_size' = 0: Input should be greater than or equal to 1"),
    ("data.truncation=middle", "'data.truncation' = 'middle'"),
    ("strategy.name=magic", "'strategy.name' = 'magic'"),
    ("train.max_steps", "not of the form dotted.key=value"),
    ("model.path.x=1", "holds a value, not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_write(tmp_path, BASE), [override])


def test_parse_override_keeps_strings():
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    assert parse_override("a.b=[q_proj, v_proj]") == ("a.b", ["q_proj", "v_proj"])
