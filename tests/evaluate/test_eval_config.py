"""The config's eval: and diff: sections: validated like every section, the settings of `tunelab eval`, `diff`
and `compare` (a run's own sections when a run is evaluated), overridden by the command line's flags, and
written resolved into each output."""

from __future__ import annotations

import json

import pytest

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.errors import ConfigError
from tunelab.train.loop import train

ROWS = [{"text": f"Tom saw a {c} {a}.", "label": c} for c in ("red", "blue") for a in ("ball", "car", "dog", "cat")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories260k):
    tmp = tmp_path_factory.mktemp("evalcfg")
    tree = config_tree(stories260k, write_jsonl(tmp / "train.jsonl", ROWS), tmp / "run",
                       strategy={"name": "full", "template": {"prompt": "{text}\nColour:", "target": " {label}"}},
                       eval={"mode": "generate", "max_new_tokens": 5, "max_examples": 3},
                       diff={"num_samples": 2, "sample_tokens": 16, "max_new_tokens": 4})
    train(validate_config(tree))
    write_jsonl(tmp / "eval.jsonl", ROWS)
    return tmp


def test_sections_validate_and_name_the_key():
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "train": {"max_steps": 1}, "output_dir": "o"}
    with pytest.raises(ConfigError, match=r"config key 'eval.max_new_tokens' = 0"):
        validate_config({**base, "eval": {"max_new_tokens": 0}})
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.modes'. Did you mean 'eval.mode'"):
        validate_config({**base, "eval": {"modes": "score"}})
    with pytest.raises(ConfigError, match=r"config key 'diff.num_samples'"):
        validate_config({**base, "diff": {"num_samples": -1}})
    assert validate_config(base).eval.mode == "auto" and validate_config(base).diff.num_samples == 8


def test_a_runs_own_sections_decide_and_flags_override_them(run, capsys):
    out = run / "r.json"
    assert main(["eval", str(run / "run"), str(run / "eval.jsonl"), "--output", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["mode"] == "generate" and summary["num_examples"] == 3  # the run's eval: section
    assert summary["settings"]["max_new_tokens"] == 5 and summary["settings"]["mode"] == "generate"
    assert main(["eval", str(run / "run"), str(run / "eval.jsonl"), "--output", str(out), "--mode", "score",
                 "--max-examples", "4"]) == 0
    summary = json.loads(out.read_text())
    assert summary["mode"] == "score" and summary["num_examples"] == 4
    assert summary["settings"]["mode"] == "score" and summary["settings"]["max_new_tokens"] == 5


def test_a_bad_flag_value_is_a_config_error(run, capsys):
    code = main(["eval", str(run / "run"), str(run / "eval.jsonl"), "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.max_new_tokens" in err and "Traceback" not in err


def test_diff_writes_the_settings_it_ran_with(run, stories260k):
    assert main(["diff", str(stories260k), str(run / "run"), "--data", str(run / "eval.jsonl"), "--seed", "3"]) == 0
    d = json.loads((run / "run" / "diff.json").read_text())
    assert d["settings"]["diff"] == {"reference_text": None, "probes": None, "num_samples": 2, "sample_tokens": 16,
                                     "max_new_tokens": 4, "seed": 3}
    assert d["settings"]["eval"]["mode"] == "generate" and d["settings"]["eval"]["seed"] == 3
    assert d["forgetting"]["num_texts"] <= 2  # diff.num_samples of the base model
