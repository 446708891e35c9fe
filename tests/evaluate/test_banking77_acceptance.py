"""Real data: stories260K tuned on banking77 (77 intents) by several strategies, evaluated by label
ranking on held-out test questions, and diffed against the base model (`tunelab compare`); the full
run's held-out loss curve shows that it learned the task."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_file
from tunelab.compare import compare
from tunelab.config import validate_config
from tunelab.runfiles import read_metrics

pytestmark = pytest.mark.slow
STEPS = 400  # the smallest budget tried in which LoRA clears both bars (200 steps: LoRA 0.045)


def test_full_and_lora_beat_chance_and_prompting_and_forgetting_is_measured(tmp_path, stories260k):
    cfg = validate_config({
        "model": {"path": str(stories260k)},
        "data": {"train": str(shared_file("banking77/train.csv")), "eval": str(shared_file("banking77/test.csv")),
                 "columns": {"label": "category"}, "max_length": 96, "max_examples": 4000, "max_eval_examples": 200},
        "strategy": {"template": {"prompt": "{text}\nIntent:", "target": " {label}"},
                     "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"max_steps": STEPS, "learning_rate": 3e-3, "batch_size": 16, "warmup_steps": 10, "seed": 0,
                  "eval_every": STEPS // 2, "progress": False},
        "diff": {"num_samples": 8, "sample_tokens": 96},
        "output_dir": str(tmp_path / "b77"),
    })
    # (a soft prompt's forgetting in a comparison is checked by the demo's test, tests/test_demo.py: scoring 77
    # options behind virtual tokens cannot share the prompt's KV cache, which made it the slowest row here)
    result = compare(cfg, ["prompting", "lora", "full"], tmp_path / "cmp", {"lora": ["train.learning_rate=5e-3"]})
    rows = {r["strategy"]: r for r in result["table"]}
    print(json.dumps(result["table"], indent=1))
    chance = 1 / 77
    # Seen on the 2-core CPU (200 test questions, 400 steps of 16 examples, seed 0, LoRA without dropout, one thread
    # as under `make test`): accuracy prompting 0.020, lora 0.160, full 0.505 (chance 0.013); perplexity of the base's
    # own stories x676 with LoRA and x7,559 with full tuning (KL 6.62 and 9.05 nats/token). With LoRA's dropout at
    # 0.05 (before): lora 0.135, and each step 18% slower (dropout's random masks cost more than the tiny model).
    assert rows["prompting"]["accuracy"] < 3 * chance
    for name in ("lora", "full"):
        assert rows[name]["accuracy"] > 8 * chance, name
        assert rows[name]["accuracy"] > rows["prompting"]["accuracy"] + 0.1, name
    for name in ("lora", "full"):
        assert rows[name]["kl_base_to_tuned"] > 0 and rows[name]["perplexity_ratio"] != 1.0
    # the comparison says which forgot more, as measured
    assert rows["full"]["perplexity_ratio"] > rows["lora"]["perplexity_ratio"]
    diff = json.loads((tmp_path / "cmp" / "full" / "diff.json").read_text())
    assert "forgetting" in diff["forgetting"]["perplexity_verdict"]["text"]
    assert (tmp_path / "cmp" / "compare.json").is_file()

    # full tuning's held-out loss on the 200 test questions falls far below the base model's
    evals = {r["step"]: r for r in read_metrics(tmp_path / "cmp" / "full" / "metrics.jsonl") if r["type"] == "eval"}
    base, tuned = evals[0], evals[STEPS]
    assert base["eval_loss"] > 8.0
    assert tuned["eval_loss"] < 0.05 * base["eval_loss"]
    assert tuned["eval_token_accuracy"] > 0.9 > 0.2 > base["eval_token_accuracy"]
    assert evals[STEPS // 2]["eval_loss"] > tuned["eval_loss"]
