"""`tunelab compare`: the small-data preset end to end, compute and both forgetting figures in its rows, and the
measured recommendation ranking forgetting the way each strategy is used."""

from __future__ import annotations

import json

import yaml

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import build_parser, main
from tunelab.compare import PRESETS, CompareRow, measured_recommendation

ROWS = [{"text": f"Tom saw a {c} {a} number {i}.", "label": c} for i in range(20) for c in ("red", "blue")
        for a in ("ball", "car", "dog")]  # 120 examples: more than the preset keeps


def test_the_small_data_preset_runs_64_examples_with_compute_and_both_forgetting_figures(tmp_path, stories260k,
                                                                                        capsys):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "train.jsonl", ROWS), tmp_path / "run",
                       data={"eval_fraction": 0.1},
                       strategy={"template": {"prompt": "{text}\nColour:", "target": " {label}"}},
                       train={"max_steps": 3}, eval={"max_examples": 4},
                       diff={"num_samples": 2, "sample_tokens": 16, "max_new_tokens": 4})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    code = main(["compare", str(tmp_path / "c.yaml"), "--preset", "small-data", "--strategies",
                 "zero-shot=prompting,soft_prompt,lora", "--set", "lora:train.learning_rate=2e-2",
                 "--set", "soft_prompt:strategy.soft_prompt.num_virtual_tokens=8",
                 "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"preset small-data: {PRESETS['small-data'].about}" in out and "forgetting ranked by" in out
    for label in ("zero-shot", "soft_prompt", "lora"):
        run = yaml.safe_load((tmp_path / "cmp" / label / "config.yaml").read_text())
        assert run["data"]["max_examples"] == 64
    soft = yaml.safe_load((tmp_path / "cmp" / "soft_prompt" / "config.yaml").read_text())["strategy"]["soft_prompt"]
    # the preset's soft prompt, with the command line's --set over the preset's own number of virtual tokens
    assert (soft["method"], soft["prefix_projection"], soft["num_virtual_tokens"]) == ("prefix_tuning", True, 8)
    lora = yaml.safe_load((tmp_path / "cmp" / "lora" / "config.yaml").read_text())
    assert lora["train"]["learning_rate"] == 2e-2
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["strategy"]: r for r in result["table"]}
    assert rows["zero-shot"]["train_flops"] == 0 and rows["lora"]["train_flops"] > 0 and rows["soft_prompt"]["train_flops"] > 0
    for name in ("soft_prompt", "lora"):  # detachable: measured with the adaptation off, exactly the base
        assert rows[name]["perplexity_ratio_off"] == 1.0 and rows[name]["kl_base_to_tuned_off"] == 0.0
        assert rows[name]["perplexity_ratio"] != 1.0
    assert rows["zero-shot"]["perplexity_ratio_off"] is None
    assert "with the adaptation off for soft prompts and adapters" in result["forgetting_ranked_by"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "perplexity ratio (off)" in report and "train FLOPs" in report


def _row(name: str, score: float, on: float, off: float | None) -> CompareRow:
    return CompareRow(name, 1, 0.1, 1.0, None, None, None, None, 1e-3, metrics={"rouge_l": score},
                      perplexity_ratio=on, perplexity_ratio_off=off)


def test_the_recommendation_ranks_a_detachable_strategy_by_its_base_with_the_adaptation_off():
    table = [_row("full", 0.50, 1.5, None), _row("lora", 0.49, 2.0, 1.0)]
    pick, why = measured_recommendation(table, "rouge_l")
    assert pick == "lora" and "x1.000 with its adaptation off" in why and "forgetting ranked by" in why
    # out of the tie band, the task score decides whatever the forgetting
    pick, _ = measured_recommendation([_row("full", 0.50, 1.5, None), _row("lora", 0.40, 2.0, 1.0)], "rouge_l")
    assert pick == "full"


def test_the_command_line_offers_exactly_the_presets():
    compare = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "compare")[1]
    preset = next(a for a in compare._actions if a.dest == "preset")
    assert list(preset.choices) == list(PRESETS)
