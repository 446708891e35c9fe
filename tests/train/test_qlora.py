"""QLoRA and memory-lean optimizers on the real stories260K model (bitsandbytes' CPU backend): a quantized base
under every strategy that keeps it frozen, against the same strategy over the dequantized weights; the 4-bit codes
never move; the adapter loads with plain peft; resume is exact with 8-bit optimizer states; 8-bit AdamW tracks
torch's AdamW; bad settings are refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import VARIED_ROWS, config_tree, crash_after_saving, write_jsonl
from tests.train.test_faults import run_cli
from tunelab.config import TrainConfig, validate_config
from tunelab.config import LoraSettings
from tunelab.models.quantize import (bitsandbytes_config, compute_as_in_training, dequantized_weight, quantize_embeddings,
                                     quantized_layers, save_dequantized_copy)
from tunelab.train import loop
from tunelab.runfiles import read_metrics
from tunelab.train.optim import build_optimizer

pytest.importorskip("bitsandbytes")


def run(tmp_path: Path, model: Path, name: str, strategy: dict, rows=VARIED_ROWS, **sections):
    train_file = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cfg = validate_config(config_tree(model, train_file, tmp_path / name, strategy=strategy, **sections))
    return loop.train(cfg)


def losses(result) -> list[float]:
    return [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]


def load_quantized(folder: Path, quantize: str, double_quant: bool = True) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=bitsandbytes_config(
        quantize, double_quant, "auto", "cpu"))


def dequantized_copy(source: Path, settings: dict, out: Path) -> Path:
    """The model with each quantized layer's weight replaced by what that layer computes with (codes times scales):
    the unquantized model that a quantized run must match."""
    quantized = load_quantized(source, settings["quantize"], settings.get("double_quant", True))
    if settings.get("quantize_embeddings"):
        quantize_embeddings(quantized, LoraSettings(**settings), "cpu")
    return save_dequantized_copy(quantized, source, out)


# strategies that keep the base frozen, each over a quantized base (the registry's quantizable_base)
FROZEN_BASE = {
    "lora-nf4": ({"name": "lora", "lora": {"quantize": "nf4"}}),
    "lora-fp4": ({"name": "lora", "lora": {"quantize": "fp4", "double_quant": False}}),
    "lora-int8": ({"name": "lora", "lora": {"quantize": "int8"}}),
    "lora-nf4-embeddings": ({"name": "lora", "lora": {"quantize": "nf4", "quantize_embeddings": True}}),
    "dora-nf4": ({"name": "lora", "lora": {"quantize": "nf4", "variant": "dora"}}),
    "ia3-nf4": ({"name": "ia3", "lora": {"quantize": "nf4"}}),
    "soft_prompt-nf4": ({"name": "soft_prompt", "lora": {"quantize": "nf4"}}),
}


@pytest.mark.parametrize("label", list(FROZEN_BASE))
def test_quantized_base_trains_as_the_same_strategy_over_its_dequantized_weights(tmp_path, stories260k, label):
    strategy = FROZEN_BASE[label]
    settings = strategy["lora"]
    quantized = run(tmp_path, stories260k, "q", strategy, train={"max_steps": 3, "learning_rate": 3e-3})
    reference = dequantized_copy(stories260k, settings, tmp_path / "dequantized")
    plain = {**strategy, "lora": {k: v for k, v in settings.items()
                                  if k not in ("quantize", "double_quant", "quantize_embeddings")}}
    unquantized = run(tmp_path, reference, "deq", plain, train={"max_steps": 3, "learning_rate": 3e-3})
    # 4-bit layers dequantize and multiply in float32 on the CPU: the same sums as the float model (bit-exact here);
    # LLM.int8 rounds differently (about 1e-7 relative); three steps also check the gradients through the codes
    torch.testing.assert_close(losses(quantized), losses(unquantized), rtol=1e-5, atol=0)
    original = run(tmp_path, stories260k, "original", plain, train={"max_steps": 1, "learning_rate": 3e-3})
    assert losses(original)[0] != losses(quantized)[0]  # quantization did change the base


def test_qlora_loss_falls_and_the_4bit_codes_never_change(tmp_path, stories260k):
    result = run(tmp_path, stories260k, "qlora", {"name": "lora", "lora": {"quantize": "nf4"}},
                 train={"max_steps": 20, "learning_rate": 3e-3, "optimizer": "adamw_8bit"})
    curve = losses(result)
    assert len(curve) == 20 and sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5, curve
    trained = {n.removesuffix(".base_layer"): m for n, m in quantized_layers(result.model.base).items()}
    fresh = quantized_layers(load_quantized(stories260k, "nf4"))
    assert set(trained) == set(fresh) and len(fresh) == 5 * 7  # every linear layer of the 5 decoder layers
    for name, layer in fresh.items():
        assert torch.equal(trained[name].weight.data, layer.weight.data), name  # the packed 4-bit codes
        assert torch.equal(dequantized_weight(trained[name]), dequantized_weight(layer)), name
        assert not trained[name].weight.requires_grad


def test_quantized_embeddings_are_one_set_of_codes_for_the_tied_head_and_never_change(tmp_path, stories260k):
    """strategy.lora.quantize_embeddings: stories260K's tied embedding and head read one frozen set of 4-bit codes
    (half a byte per weight), which training leaves as they were; evaluation loads the run the same way."""
    from tunelab.evaluate.loaders import load_for_eval

    settings = {"quantize": "nf4", "quantize_embeddings": True}
    result = run(tmp_path, stories260k, "qlora", {"name": "lora", "lora": settings},
                 train={"max_steps": 3, "learning_rate": 3e-3})
    base = result.model.base
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    codes = embed.parametrizations.weight.original
    assert head.parametrizations.weight.original is codes  # one set of codes, as the float model had one table
    assert codes.dtype == torch.uint8 and codes.numel() * 2 == 512 * 64 and not codes.requires_grad
    fresh = load_quantized(stories260k, "nf4")
    float_table = fresh.get_input_embeddings().weight.detach().clone()
    quantize_embeddings(fresh, LoraSettings(**settings), "cpu")
    assert torch.equal(fresh.get_input_embeddings().parametrizations.weight.original, codes)  # unchanged by training
    assert torch.equal(dequantized_weight(head), dequantized_weight(fresh.get_output_embeddings()))
    error = (dequantized_weight(head) - float_table).abs().max() / float_table.abs().max()
    assert 0 < error < 0.15  # 4-bit: close to the float table, and not it
    loaded = load_for_eval(str(result.run_dir), device="cpu", precision="fp32")
    assert "lm_head" in quantized_layers(loaded.model.base)
    ids = torch.tensor([[1, 57, 300, 42, 9, 120, 77]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.lm(input_ids=ids).logits, result.model.lm.eval()(input_ids=ids).logits)


def test_qlora_adapter_loads_with_plain_peft_over_a_4bit_base(tmp_path, stories260k):
    from peft import PeftModel

    result = run(tmp_path, stories260k, "qlora", {"name": "lora", "lora": {"quantize": "nf4"}},
                 train={"max_steps": 4, "learning_rate": 3e-3})
    loaded = PeftModel.from_pretrained(load_quantized(stories260k, "nf4"), result.final_dir).eval()
    # bitsandbytes' CPU inference kernel (AVX512-BF16) takes only output widths that are multiples of 32, and
    # stories260K's MLP is 172 wide: its 4-bit layers compute as in training (dequantize, multiply in float32)
    compute_as_in_training(loaded)
    trained = result.model.lm.eval()
    ids = torch.tensor([[1, 57, 300, 42, 9, 120, 77]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        with loaded.disable_adapter():  # and the adapter did change the model
            assert not torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_qlora_with_8bit_adamw_resumes_exactly(tmp_path, stories260k, monkeypatch):
    # rank 64 on q and o projections of a 64-wide model: each LoRA matrix has 4096 values, enough for 8-bit moments
    # (smaller tensors keep 32-bit ones: bitsandbytes' min_8bit_size)
    strategy = {"name": "lora", "lora": {"quantize": "nf4", "rank": 64, "target_modules": ["q_proj", "o_proj"]}}
    train = {"max_steps": 6, "save_every": 3, "batch_size": 3, "warmup_steps": 2, "optimizer": "adamw_8bit"}
    whole = run(tmp_path, stories260k, "whole", strategy, train=train)
    restore = crash_after_saving(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, stories260k, "resumed", strategy, train=train)
    restore()
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-3" / "state.pt", weights_only=True)["optimizer"]
    moments = [s["__bnb_optimizer_quant_state__"] for s in state["state"].values()]  # how bitsandbytes saves them
    assert {m["state1"].dtype for m in moments} == {torch.uint8}  # every A and B matrix holds 64 x 64 values
    resumed = run(tmp_path, stories260k, "resumed", strategy, resume=True, train=train)
    assert losses(resumed) == losses(whole)
    a, b = (load_file(str(r.final_dir / "adapter_model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adamw_tracks_adamw_over_20_steps():
    """The same least-squares problem under tunelab's adamw and adamw_8bit: after each of 20 steps, the 8-bit
    optimizer's total update of the (64, 128) weight is within 5% (relative L2) of torch's AdamW's."""
    torch.manual_seed(0)
    inputs, true_weight = torch.randn(256, 128), torch.randn(64, 128) * 0.1
    targets = inputs @ true_weight.T
    updates = {}
    for name in ("adamw", "adamw_8bit"):
        torch.manual_seed(1)
        layer = torch.nn.Linear(128, 64)
        start = layer.weight.detach().clone()
        optimizer = build_optimizer(layer, TrainConfig(optimizer=name, learning_rate=1e-2, weight_decay=0.01),
                                    torch.device("cpu"))
        updates[name] = []
        for _ in range(20):
            ((layer(inputs) - targets) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            updates[name].append(layer.weight.detach() - start)
        if name == "adamw_8bit":
            assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8  # 8-bit moments, the bias 32-bit
            assert optimizer.state[layer.bias]["state1"].dtype == torch.float32
    errors = [float((q - f).norm() / f.norm()) for q, f in zip(updates["adamw_8bit"], updates["adamw"])]
    assert errors[0] < 1e-6  # the first step is sign-like: no state to quantize yet
    assert max(errors) < 0.05, errors
    assert max(errors) > 1e-4  # the moments were quantized: not torch's optimizer under another name


@pytest.mark.parametrize("strategy", ["full", "freeze", "prompt_lm"])
def test_quantized_base_refused_for_strategies_that_train_base_weights(tmp_path, stories260k, capsys, strategy):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": strategy, "lora": {"quantize": "nf4"}, "freeze": {"trainable_layers": 1}})
    code, err = _cli(tmp_path, capsys, tree)
    assert code == 2 and "Traceback" not in err
    assert "strategy.lora.quantize is nf4" in err and f"strategy.name {strategy} trains the base" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy,lora,message", [
    ("lora", {"quantize": "int8", "quantize_embeddings": True}, "strategy.lora.quantize is int8: set it to nf4"),
    ("lora", {"quantize_embeddings": True}, "strategy.lora.quantize is not set: set it to nf4"),
    ("soft_prompt", {"quantize": "nf4", "quantize_embeddings": True}, "a soft prompt (strategy.name soft_prompt)")])
def test_quantized_embeddings_refused_where_they_cannot_work(tmp_path, stories260k, capsys, strategy, lora, message):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": strategy, "lora": lora})
    code, err = _cli(tmp_path, capsys, tree)
    assert code == 2 and "Traceback" not in err and "strategy.lora.quantize_embeddings" in err and message in err
    assert not (tmp_path / "run").exists()


def test_paged_optimizer_refused_on_the_cpu_before_anything_is_written(tmp_path, stories260k, capsys):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "lora"}, train={"optimizer": "paged_adamw_8bit", "device": "cpu"})
    code, err = _cli(tmp_path, capsys, tree)
    assert code == 2 and "Traceback" not in err
    assert "train.optimizer is paged_adamw_8bit" in err and "adamw_8bit" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value", [("strategy.lora.quantize", "nf4"), ("train.optimizer", "adamw_8bit")])
def test_missing_bitsandbytes_is_named(tmp_path, stories260k, capsys, monkeypatch, key, value):
    import tunelab.config

    monkeypatch.setattr(tunelab.config, "bitsandbytes_installed", lambda: False)
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "lora"})
    code, err = _cli(tmp_path, capsys, tree, f"{key}={value}")
    assert code == 2 and "Traceback" not in err
    assert f"{key} is {value}, but bitsandbytes is not installed" in err and "pip install" in err
    assert not (tmp_path / "run").exists()


def _cli(tmp_path, capsys, tree, *overrides):
    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code, err, _ = run_cli(capsys, cfg, *overrides)
    return code, err


def test_a_qlora_run_evaluates_over_its_4bit_base(tmp_path, stories260k):
    """`tunelab eval` / `diff` / `compare` load a run's adapter over the base it trained on: the 4-bit one."""
    from tunelab.evaluate.loaders import load_for_eval

    result = run(tmp_path, stories260k, "qlora", {"name": "lora", "lora": {"quantize": "nf4"}},
                 train={"max_steps": 3, "learning_rate": 3e-3})
    loaded = load_for_eval(str(result.run_dir), device="cpu", precision="fp32")
    assert len(quantized_layers(loaded.model.base)) == 5 * 7
    ids = torch.tensor([[1, 57, 300, 42, 9, 120, 77]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.lm(input_ids=ids).logits, result.model.lm.eval()(input_ids=ids).logits)


def test_importing_bitsandbytes_asks_no_hub_for_a_kernel():
    """bitsandbytes (imported by peft up to 0.21, and by tunelab for a quantized base) asks `kernels` for a Hub kernel
    at import on a CPU with AVX512-BF16: after `import tunelab` it gets none, and prints nothing (its own CPU kernel
    serves)."""
    import subprocess
    import sys

    code = ("import tunelab, kernels\n"
            "calls = []\n"
            "kernels.get_kernel = lambda *a, **k: calls.append(a)\n"
            "import bitsandbytes\n"
            "print(len(calls))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0"]
    assert "kernels-community" not in proc.stderr and "trust" not in proc.stderr


def test_compare_runs_qlora_as_a_labelled_variant_of_lora(tmp_path, stories260k, capsys):
    """`tunelab compare --strategies lora,qlora=lora --set qlora:strategy.lora.quantize=nf4`: the QLoRA row is
    evaluated over its 4-bit base, and with the adaptation off it is that base, not the 16-bit one (its forgetting
    figure then shows what quantizing alone cost); LoRA's row with the adaptation off is exactly the base."""
    import json

    import yaml

    from tunelab.cli import main

    rows = [{"text": f"Tom saw a {c} {a} number {i}.", "label": c} for i in range(10) for c in ("red", "blue")
            for a in ("ball", "car")]
    tree = config_tree(stories260k, write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "run",
                       data={"eval_fraction": 0.1}, strategy={"template": {"prompt": "{text}\nColour:",
                                                                           "target": " {label}"}},
                       train={"max_steps": 3, "learning_rate": 1e-2}, eval={"max_examples": 4},
                       diff={"num_samples": 2, "sample_tokens": 16, "max_new_tokens": 4})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    code = main(["compare", str(tmp_path / "c.yaml"), "--strategies", "lora,qlora=lora",
                 "--set", "qlora:strategy.lora.quantize=nf4", "--out", str(tmp_path / "cmp")])
    assert code == 0, capsys.readouterr()
    run = yaml.safe_load((tmp_path / "cmp" / "qlora" / "config.yaml").read_text())
    assert run["strategy"]["name"] == "lora" and run["strategy"]["lora"]["quantize"] == "nf4"
    table = {r["strategy"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["table"]}
    assert table["lora"]["perplexity_ratio_off"] == 1.0
    assert table["qlora"]["perplexity_ratio_off"] != 1.0
    assert table["qlora"]["peak_memory_mib"] > 0 and table["qlora"]["trainable_params"] == \
        table["lora"]["trainable_params"]


def test_qlora_under_activation_checkpointing_takes_the_same_steps(tmp_path, stories260k):
    """peft's k-bit preparation leaves checkpointing to train.activation_checkpointing (non-reentrant: the frozen
    4-bit base needs no input gradients for it)."""
    strategy = {"name": "lora", "lora": {"quantize": "nf4"}}
    plain = run(tmp_path, stories260k, "plain", strategy, train={"max_steps": 2, "batch_size": 6})
    ckpt = run(tmp_path, stories260k, "ckpt", strategy,
               train={"max_steps": 2, "batch_size": 6, "activation_checkpointing": True})
    assert losses(ckpt) == losses(plain)


def test_adapters_served_beside_a_base_with_4bit_embeddings_keep_their_float_precision():
    """`tunelab serve` moves an added adapter to the host model's device and float dtype: with quantize_embeddings
    the host's first parameter is a table of uint8 codes, which must not become the adapter's dtype."""
    from types import SimpleNamespace

    from tunelab.serve.pool import _to_host

    host_model = torch.nn.Module()
    host_model.codes = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    host_model.norm = torch.nn.Parameter(torch.ones(4))
    adapter = torch.nn.Linear(4, 2)
    _to_host(adapter, SimpleNamespace(model=host_model))
    assert adapter.weight.dtype == torch.float32 and adapter.bias.dtype == torch.float32
