"""Config: YAML plus dotted overrides, validated, with helpful errors."""

from __future__ import annotations

import re

import pytest
import yaml

from tunelab.config import Config, dump_config, load_config, parse_override, validate_config
from tunelab.errors import ConfigError
from tunelab.strategies.registry import STRATEGIES

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


# -- Config.for_strategy: the one derivation of a strategy's config ------------------------------------------------
# The derivations it replaced, as they were written before it (compare.py's preset and per-strategy configs,
# tunelab plan's, the step timer's): the reference its configs must equal.

def _preset_before(cfg, max_examples):  # compare.apply_preset
    tree = cfg.model_dump(mode="json")
    tree["data"]["max_examples"] = max_examples
    return validate_config(tree, "compare preset")


def _compare_before(cfg, name, out_dir, texts):  # compare.strategy_configs
    from tunelab.config import _set_dotted

    tree = cfg.model_dump(mode="json")
    tree["strategy"]["name"] = name
    tree["output_dir"] = str(out_dir)
    tree["overwrite"], tree["resume"] = True, False
    for text in texts:
        _set_dotted(tree, *parse_override(text))
    return validate_config(tree, "compare")


def _plan_before(cfg, name, layers):  # plan.run.plan
    tree = cfg.model_dump(mode="json")
    tree["strategy"]["name"] = name
    if STRATEGIES[name].base == "chosen" and not (cfg.strategy.freeze.trainable_layers or cfg.strategy.freeze.modules):
        tree["strategy"]["freeze"] = {"trainable_layers": max(1, layers // 4)}
    return Config.model_validate(tree)


def _timer_before(cfg, trainable_layers):  # train.timing.measured_step_seconds
    tree = cfg.model_dump(mode="json")
    tree["strategy"]["freeze"] = {"trainable_layers": trainable_layers}
    return Config.model_validate(tree)


USER = {**BASE, "strategy": {"name": "lora", "template": "Q: {text}", "lora": {"rank": 4},
                             "soft_prompt": {"num_virtual_tokens": 7}}, "train": {"max_steps": 3, "seed": 5}}
PLANNED_NAMES = [n for n, s in STRATEGIES.items() if s.planned]


def test_compare_derives_each_strategy_config_as_before(tmp_path):
    from tunelab.compare import PRESETS, apply_preset, strategy_configs

    cfg = load_config(_write(tmp_path, USER))
    preset = PRESETS["small-data"]
    shared, names, overrides = apply_preset(cfg, preset, {"lora": ["train.learning_rate=2e-2"]})
    assert shared == _preset_before(cfg, preset.max_examples) and shared.data.max_examples == 64
    configs = strategy_configs(shared, names, tmp_path / "cmp", overrides)
    assert list(configs) == ["zero-shot", "few-shot", "soft_prompt", "lora", "ia3", "freeze", "full", "prompt_lm"]
    for entry in names:
        label, _, name = entry.rpartition("=")
        label = label or name
        before = _compare_before(shared, name, tmp_path / "cmp" / label, overrides.get(label, []))
        assert configs[label] == before, label
    assert configs["lora"].train.learning_rate == 2e-2 and configs["freeze"].strategy.freeze.trainable_layers == 2
    assert configs["soft_prompt"].strategy.soft_prompt.method == "prefix_tuning"
    assert configs["few-shot"].strategy.num_shots == 2


@pytest.mark.parametrize("freeze", [{}, {"trainable_layers": 3}, {"modules": ["model.layers.*.mlp"]}])
def test_plan_and_the_step_timer_derive_each_strategy_config_as_before(tmp_path, freeze):
    cfg = load_config(_write(tmp_path, {**USER, "strategy": {**USER["strategy"], "freeze": freeze}}))
    for name in PLANNED_NAMES:
        chosen = STRATEGIES[name].base == "chosen" and not freeze
        derived = cfg.for_strategy(name, {"strategy.freeze": {"trainable_layers": 2}} if chosen else {})
        assert derived == _plan_before(cfg, name, 8), name
        assert derived.strategy.name == name and derived.strategy.lora.rank == 4 and derived.train.seed == 5
    timed = load_config(_write(tmp_path, {**USER, "strategy": {"name": "freeze", "freeze": {"trainable_layers": 3}}}))
    for k in (1, 2):
        assert timed.for_strategy("freeze", {"strategy.freeze": {"trainable_layers": k}}) == _timer_before(timed, k)


def test_for_strategy_applies_overrides_in_order_in_every_form(tmp_path):
    cfg = load_config(_write(tmp_path, USER))
    texts = cfg.for_strategy("freeze", ["strategy.freeze.trainable_layers=1", "strategy.freeze={modules: [a]}",
                                        "strategy.freeze.modules=[b]"])
    pairs = cfg.for_strategy("freeze", [("strategy.freeze.trainable_layers", 1),
                                        ("strategy.freeze", {"modules": ["a"]}), ("strategy.freeze.modules", ["b"])])
    assert texts == pairs and texts.strategy.freeze.modules == ["b"] and texts.strategy.freeze.trainable_layers is None
    assert cfg.for_strategy("lora") == cfg and cfg.strategy.name == "lora"  # the user's config is not changed


@pytest.mark.parametrize("name, overrides, message", [
    ("lora", ["strategy.lora.rnak=4"], "unknown config key 'strategy.lora.rnak'. Did you mean 'strategy.lora.rank'?"),
    ("lora", {"train.learning_rat": 1e-3}, "Did you mean 'train.learning_rate'?"),
    ("magic", {}, "'strategy.name' = 'magic'"),
    ("freeze", {}, "strategy freeze needs exactly one of"),
    ("lora", ["model.path.x=1"], "holds a value, not a section"),
])
def test_for_strategy_rejects_a_bad_key_as_the_loader_does(tmp_path, name, overrides, message):
    cfg = load_config(_write(tmp_path, USER))
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.for_strategy(name, overrides, "compare, strategy x")


def test_for_strategy_names_its_source_in_the_error(tmp_path):
    cfg = load_config(_write(tmp_path, USER))
    with pytest.raises(ConfigError, match=r"^compare, strategy x: unknown config key 'train\.max_stepz'"):
        cfg.for_strategy("full", ["train.max_stepz=3"], "compare, strategy x")
    with pytest.raises(ConfigError, match=r"^the config for strategy full: "):
        cfg.for_strategy("full", ["train.max_stepz=3"])


@pytest.mark.parametrize("name", ["soft_prompt", "prompt_lm"])
def test_a_prefix_under_activation_checkpointing_is_refused_for_every_strategy_that_adds_one(tmp_path, name):
    """The recomputation would extend the prefix's KV cache a second time: before, prompt_lm reached a shape error
    in attention (a traceback) because only the name soft_prompt was refused."""
    tree = {**BASE, "strategy": {"name": name, "soft_prompt": {"method": "prefix_tuning"}},
            "train": {"max_steps": 3, "activation_checkpointing": True}}
    with pytest.raises(ConfigError, match="turn train.activation_checkpointing off"):
        load_config(_write(tmp_path, tree))
    tree["strategy"]["soft_prompt"]["method"] = "p_tuning"
    assert load_config(_write(tmp_path, tree)).train.activation_checkpointing
