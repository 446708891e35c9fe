"""The estimates against measurements on this CPU: peak memory and step time within 25% (asserted).

Three models (stories260K and two config-built sizes) x three strategies (full, lora, soft_prompt),
and the top layer alone (freeze) on one of them:
each is estimated by `tunelab plan`, then trained for a few steps in a fresh process whose peak
resident memory and step times are measured. The memory constants were calibrated on banking77
(short questions, rows of 128); this validation uses another workload: GSM8K (long questions and
worked answers, rows of 512, 3,072 tokens per step). The step time is measured by the plan itself
(real steps of cut copies of the model, tunelab.train.timing), so this checks that a cut copy's
steps, extrapolated to all layers, predict the whole model's; the plan runs before and after the
measured run, and the faster of the two is compared (the machine's speed drifts over minutes, and
another process only ever slows a timing down). Memory must be within 25% on every attempt; the
step time on one of up to three attempts (plan, run, plan), so that a minute in which the shared
machine was slowed does not fail the check, while an estimator that is wrong fails all three.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import config_tree, shared_file, write_jsonl
from tunelab.config import validate_config
from tunelab.plan.run import plan
from tunelab.train.metrics import read_metrics

pytestmark = pytest.mark.slow
SIZES = {"small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096),
         "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=8192)}
TOLERANCE = 0.25
ATTEMPTS = 3  # a step-time miss is measured again, at most twice: see _estimate_and_measure


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories260k):
    out = {"stories260K": stories260k}
    for name, arch in SIZES.items():
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**arch, tie_word_embeddings=True)).save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(stories260k / f, path / f)
        out[name] = path
    return out


def _measure(cfg_path) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = yaml.safe_load(cfg_path.read_text())["output_dir"]
    rows = read_metrics(f"{out}/metrics.jsonl")
    steps = [r["seconds"] for r in rows if r["type"] == "train"][2:]
    peak = next(r for r in rows if r["type"] == "summary")["peak_memory_bytes"]
    return peak, statistics.median(steps)


CASES = [(size, strategy) for size in ("stories260K", "small", "medium") for strategy in ("full", "lora", "soft_prompt")]
# and the top layer alone: frozen layers below it run forward only, which the plan times apart
CASES.append(("small", "freeze"))


@pytest.mark.parametrize("size, strategy", CASES)
def test_estimates_within_25_percent(models, tmp_path, size, strategy):
    rows = [json.loads(line) for line in shared_file("gsm8k/train.jsonl").read_text().splitlines()[:1500]]
    tree = config_tree(models[size], write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run",
                       data={"max_length": 512, "columns": {"prompt": "question", "completion": "answer"}},
                       strategy={"name": strategy, "freeze": {"trainable_layers": 1}, "template": {"prompt": "Question: {prompt}\nAnswer:",
                                                                "target": " {completion}"}},
                       train={"max_steps": 8, "tokens_per_step": 3072, "learning_rate": 1e-3})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    records = []
    for _ in range(ATTEMPTS):
        record = _estimate_and_measure(tree, cfg_path, strategy)
        record.update(size=size, strategy=strategy)
        print(json.dumps(record))
        records.append(record)
        # memory does not drift: every attempt must be within the tolerance
        assert _error(record["memory_estimate"], record["memory_measured"]) < TOLERANCE, record
        if _error(record["step_estimate"], record["step_measured"]) < TOLERANCE:
            return
        shutil.rmtree(tree["output_dir"])
    pytest.fail(f"step-time estimate off by more than {TOLERANCE:.0%} in {ATTEMPTS} attempts: {records}")


def _error(estimate: float, measured: float) -> float:
    return abs(estimate - measured) / measured


def _estimate_and_measure(tree: dict, cfg_path, strategy: str) -> dict:
    """The plan's estimates, timed just before and just after a measured training run."""
    before = plan(validate_config(tree), "cpu", strategies=[strategy]).estimates[strategy]
    peak, step = _measure(cfg_path)
    after = plan(validate_config(tree), "cpu", strategies=[strategy]).estimates[strategy]
    # Another process on this shared 2-core machine only ever slows a timing down (the same medium full
    # plan timed 17.1 s and 8.8 s a minute apart, against 8.4 s measured), so the faster of the two plans
    # is this machine's speed; a run measured while the machine was slowed is measured again.
    return {"memory_estimate": before.memory_bytes["total"], "memory_measured": peak,
            "step_estimate": min(before.step_seconds, after.step_seconds), "step_measured": step,
            "step_estimates": [before.step_seconds, after.step_seconds]}
