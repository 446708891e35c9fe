"""End-to-end training runs on the real stories260K model: invariances a user relies on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import VARIED_ROWS, config_tree, crash_after_saving, write_jsonl
from tunelab.config import validate_config
from tunelab.train import loop
from tunelab.runfiles import read_metrics


def run(tmp_path, stories260k, name, rows=VARIED_ROWS, **sections):
    train_file = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cfg = validate_config(config_tree(stories260k, train_file, tmp_path / name, **sections))
    return loop.train(cfg)


def final_weights(result):
    return load_file(str(result.final_dir / "model.safetensors"))


def train_rows(result):
    return [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]


def test_grad_accumulation_equals_one_big_batch(tmp_path, stories260k, monkeypatch):
    from tests.train.step1_grads import ENV_KEY, _dumping

    lengths = [len(r["prompt"]) + len(r["completion"]) for r in VARIED_ROWS[:8]]
    assert max(lengths) > 5 * min(lengths)  # very different lengths: a mean of means would differ
    real, results = loop.accumulate_gradients, {}
    for name, batch_size, grad_accum in (("big", 8, 1), ("acc", 2, 4)):  # each run saves its step-1 gradients
        monkeypatch.setenv(ENV_KEY, str(tmp_path / f"{name}.step1-grads.pt"))
        monkeypatch.setattr(loop, "accumulate_gradients", _dumping(real))
        results[name] = run(tmp_path, stories260k, name,
                            train={"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum})
    big, acc = results["big"], results["acc"]
    assert train_rows(big)[0]["num_label_tokens"] == train_rows(acc)[0]["num_label_tokens"]
    assert train_rows(big)[0]["loss"] == pytest.approx(train_rows(acc)[0]["loss"], rel=1e-6)
    torch.testing.assert_close(train_rows(acc)[0]["grad_norm"], train_rows(big)[0]["grad_norm"], rtol=1e-5, atol=0)
    gb, ga = (torch.load(tmp_path / f"{n}.step1-grads.pt", weights_only=True) for n in ("big", "acc"))
    assert set(ga) == set(gb)
    for name in gb:  # Adam's first step is about lr * sign(gradient): the weights alone would hide a scale error
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=3e-5 * float(gb[name].abs().max()), msg=name)
    wb, wa = final_weights(big), final_weights(acc)
    base = load_file(str(stories260k / "model.safetensors"))
    assert any(not torch.equal(wb[k], base[k]) for k in wb)  # the step did move the weights
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], msg=name)


def test_resume_equals_an_uninterrupted_run(tmp_path, stories260k, monkeypatch):
    sections = {"train": {"max_steps": 6, "save_every": 3, "batch_size": 3, "warmup_steps": 2}}
    whole = run(tmp_path, stories260k, "whole", **sections)

    restore = crash_after_saving(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, stories260k, "resumed", **sections)
    restore()
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = run(tmp_path, stories260k, "resumed", resume=True, **sections)

    assert [r["step"] for r in train_rows(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train_rows(resumed)] == [r["loss"] for r in train_rows(whole)]
    assert [r["lr"] for r in train_rows(resumed)] == [r["lr"] for r in train_rows(whole)]
    ww, wr = final_weights(whole), final_weights(resumed)
    for name in ww:
        assert torch.equal(ww[name], wr[name]), name


def test_cpu_run_is_repeatable_bit_for_bit(tmp_path, stories260k):
    sections = {"train": {"max_steps": 3, "batch_size": 4}}
    a = run(tmp_path, stories260k, "a", **sections)
    b = run(tmp_path, stories260k, "b", **sections)
    assert [r["loss"] for r in train_rows(a)] == [r["loss"] for r in train_rows(b)]
    assert all(torch.equal(x, final_weights(b)[k]) for k, x in final_weights(a).items())


def test_run_directory_and_final_model(tmp_path, stories260k):
    result = run(tmp_path, stories260k, "r", data={"eval_fraction": 0.25},
                 train={"max_steps": 4, "eval_every": 2, "save_every": 1, "keep_checkpoints": 2})
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    params = rows[0]
    assert params["type"] == "params" and params["trainable_params"] == params["total_params"] == 260_032
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "num_tokens", "num_label_tokens", "tokens_per_s"):
        assert all(key in r for r in train), key
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 2, 4]
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step-3", "step-4"]
    saved = (result.run_dir / "config.yaml").read_text()
    assert "max_steps: 4" in saved and "learning_rate: 0.001" in saved  # resolved, defaults written out

    # plain transformers loads final/ and gives the logits of the trained weights
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.eos_token == "</s>"
    trained = json.loads(json.dumps(model.config.to_dict()))
    assert trained["use_cache"] is True
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(result.final_dir)
    base.load_state_dict(load_file(str(result.run_dir / "checkpoints" / "step-4" / "trainable.safetensors")),
                         strict=False)
    torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_packed_run_resumes_exactly(tmp_path, stories260k, monkeypatch):
    sections = {"data": {"max_length": 192}, "train": {"max_steps": 4, "save_every": 2, "tokens_per_step": 768,
                                                       "tokens_per_micro_batch": 384}}
    whole = run(tmp_path, stories260k, "whole", **sections)
    rows = train_rows(whole)
    assert all(384 < r["num_tokens"] <= 768 for r in rows)  # two rows of 192 per micro-batch hold several examples
    restore = crash_after_saving(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        run(tmp_path, stories260k, "resumed", **sections)
    restore()
    resumed = run(tmp_path, stories260k, "resumed", resume=True, **sections)
    assert [r["loss"] for r in train_rows(resumed)] == [r["loss"] for r in rows]
    assert all(torch.equal(x, final_weights(resumed)[k]) for k, x in final_weights(whole).items())


def test_activation_checkpointing_takes_the_same_step(tmp_path, stories260k):
    plain = run(tmp_path, stories260k, "plain", train={"max_steps": 1, "batch_size": 6})
    ckpt = run(tmp_path, stories260k, "ckpt", train={"max_steps": 1, "batch_size": 6, "activation_checkpointing": True})
    assert train_rows(plain)[0]["loss"] == pytest.approx(train_rows(ckpt)[0]["loss"], rel=1e-6)
    for name, w in final_weights(plain).items():
        torch.testing.assert_close(final_weights(ckpt)[name], w, msg=name)


@pytest.mark.slow
def test_compiled_decoder_matches_eager(tmp_path, stories260k):
    # one step of 8 rows of very different lengths: one compilation (a second batch shape would compile again,
    # doubling the test's time for no more coverage); the update shows the compiled backward's gradients
    eager = run(tmp_path, stories260k, "eager", train={"max_steps": 1, "batch_size": 8, "compile": "off"})
    compiled = run(tmp_path, stories260k, "compiled", train={"max_steps": 1, "batch_size": 8, "compile": "on"})
    assert [r["loss"] for r in train_rows(compiled)] == pytest.approx([r["loss"] for r in train_rows(eager)], rel=1e-4)
    assert sorted(final_weights(compiled)) == sorted(final_weights(eager))  # no _orig_mod. prefixes
    for name, w in final_weights(eager).items():
        torch.testing.assert_close(final_weights(compiled)[name], w, rtol=1e-4, atol=1e-5, msg=name)


FLUSHED_SHARE = """
import sys, torch
from tunelab.config import load_config
from tunelab.train.loop import train
train(load_config(sys.argv[1]))
x = torch.full((1 << 22,), 1e-39)  # a denormal float32; a parallel product runs on every intra-op thread
print(torch.get_num_threads(), (x * 1.0 == 0).float().mean().item())
"""


@pytest.mark.parametrize("flush", [True, False])
def test_cpu_training_flushes_denormals_on_every_thread(tmp_path, stories260k, flush):
    """`train.flush_denormals` reaches every intra-op thread of a `tunelab train` process, not only the main one
    (the threads copy the flag from the thread that starts them, so it must be set before the first parallel op)."""
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       train={"flush_denormals": flush, "progress": False})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([sys.executable, "-c", FLUSHED_SHARE, str(cfg)], capture_output=True, text=True, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, share = proc.stdout.split()[-2:]
    assert int(threads) > 1  # one thread would not tell the main thread from the others
    assert float(share) == (1.0 if flush else 0.0)


def test_a_run_prints_each_data_summary_once_and_no_third_party_deprecation(tmp_path, stories260k):
    """What a user sees on the console: the data summaries once each (and in train.log), and no FutureWarning
    from peft's use of transformers' deprecated `is_gradient_checkpointing` (printed by every LoRA run before)."""
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       data={"eval": str(write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[:4]))},
                       strategy={"name": "lora"}, train={"max_steps": 1})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert console.count("train data: 24 examples") == 1 and console.count("eval data: 4 examples") == 1, console
    assert "FutureWarning" not in console and "is_gradient_checkpointing" not in console
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("train data: 24 examples") == 1 and log.count("eval data: 4 examples") == 1, log
