"""The planner's figures for a quantized base and 8-bit optimizer states, against what bitsandbytes allocates."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import LoraSettings, ModelConfig, TrainConfig, validate_config
from tunelab.plan.estimate import OPTIMIZER_STATES, base_weight_bytes, model_shape
from tunelab.plan.run import plan
from tunelab.strategies.registry import STRATEGIES, planned_strategies

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, stories260k):
    """A config-built Llama 256 wide, 4 layers (tests/plan/test_validation.py's small size): wide enough that the
    per-layer constants of a 4-bit layer (its code tables, about 1 KiB) are noise, as in any real model."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / name, path / name)
    return path


@pytest.mark.parametrize("quantize, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", True)])
def test_quantized_weight_bytes_equal_the_loaded_model(tmp_path, small_model, quantize, double_quant):
    """Codes, block scales (and their scales), int8's row scales and the float32 rest, against the loaded model's
    own bytes."""
    from tunelab.models.load import load_model
    from tunelab.models.quantize import loaded_bytes

    settings = LoraSettings(quantize=quantize, double_quant=double_quant)
    cfg = validate_config(config_tree(small_model, tmp_path / "d.jsonl", tmp_path / "run",
                                      strategy={"name": "lora", "lora": settings.model_dump()}))
    shape = model_shape(str(small_model))
    loaded = load_model(ModelConfig(path=str(small_model)), quantize=settings)
    assert base_weight_bytes(shape, cfg, shape.total_params) == pytest.approx(loaded_bytes(loaded), rel=0.01)
    assert base_weight_bytes(shape, cfg, shape.total_params) < 0.6 * shape.total_params * 4


def test_8bit_adamw_state_bytes_equal_what_bitsandbytes_allocates():
    layer = torch.nn.Linear(512, 256, bias=False)  # 131,072 values: 8-bit states
    optimizer = __import__("tunelab.train.optim", fromlist=["build_optimizer"]).build_optimizer(
        layer, TrainConfig(optimizer="adamw_8bit"), torch.device("cpu"))
    layer(torch.randn(4, 512)).sum().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    # the moments' codes and block scales; the two 256-entry code tables are per tensor, not per value
    held = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert OPTIMIZER_STATES["adamw_8bit"] * 4 * layer.weight.numel() == pytest.approx(held, rel=1e-6)


def test_plan_of_a_quantized_config_plans_every_strategy(tmp_path, stories260k):
    """strategy.lora.quantize set: strategies that keep the base frozen are planned over the quantized base,
    the others (full, freeze, prompt+LM) over the unquantized one, instead of the plan refusing them."""
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "lora", "lora": {"quantize": "nf4"}}, train={"optimizer": "adamw_8bit"})
    estimates = plan(validate_config(tree), "cpu").estimates
    assert set(planned_strategies()) <= set(estimates)
    unquantized = plan(validate_config({**tree, "strategy": {"name": "lora"}}), "cpu", strategies=["lora"])
    assert estimates["lora"].memory_bytes["weights"] < unquantized.estimates["lora"].memory_bytes["weights"]
    assert "dequantization" in estimates["lora"].memory_bytes
    for name, e in estimates.items():
        assert ("dequantization" in e.memory_bytes) == STRATEGIES[name].quantizable_base, name


def test_measured_steps_of_a_quantized_config_run_on_quantized_copies(tmp_path, stories260k, monkeypatch):
    """`tunelab plan --measure` times cut copies of the model quantized as the config asks."""
    import tunelab.models.load as load
    from tunelab.data.dataset import load_datasets
    from tunelab.data.render import spec_from_config
    from tunelab.models.load import load_tokenizer
    from tunelab.train.timing import time_cut_model

    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "lora", "lora": {"quantize": "nf4"}})
    cfg = validate_config(tree)
    tokenizer = load_tokenizer(cfg.model)
    encoded = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, 0)[0].encoded
    asked = []
    real = load.quantized_loading
    monkeypatch.setattr(load, "quantized_loading", lambda *a, **k: asked.append(a[0].quantize) or real(*a, **k))
    from transformers import AutoConfig

    seconds = time_cut_model(cfg, AutoConfig.from_pretrained(stories260k), 1, encoded, tokenizer)
    assert seconds > 0 and asked == ["nf4"]
