"""Every strategy trains exactly what it should, saves what a user needs, and reloads with plain peft."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import VARIED_ROWS, config_tree, crash_after_saving, write_jsonl
from tunelab.config import StrategyConfig, validate_config
from tunelab.errors import ConfigError
from tunelab.models.load import load_model, load_tokenizer
from tunelab.strategies.model import count_parameters
from tunelab.strategies.prepare import prepare_strategy
from tunelab.export.hf import export_run
from tunelab.strategies.final import load_final
from tunelab.train import loop
from tunelab.train.session import seed_everything
from tunelab.runfiles import read_metrics

TEMPLATE = {"prompt": "Story: {prompt}\nEnd:", "target": "{completion}"}
# strategy config -> predicate on a parameter name of the TrainModel: True where it must change
CASES = {
    "full": ({"name": "full"}, lambda n: True),
    "fixed_prompt": ({"name": "fixed_prompt", "template": TEMPLATE}, lambda n: True),
    "fixed_prompt_lora": ({"name": "fixed_prompt", "template": TEMPLATE, "fixed_prompt": {"tune": "lora"}},
                          lambda n: "lora_" in n),
    "lora": ({"name": "lora", "lora": {"dropout": 0.0}}, lambda n: "lora_" in n),
    "dora": ({"name": "lora", "lora": {"variant": "dora", "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
             lambda n: "lora_" in n),
    "rslora": ({"name": "lora", "lora": {"variant": "rslora", "rank": 4, "dropout": 0.0}}, lambda n: "lora_" in n),
    "prompt_tuning": ({"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 6, "init_text": "a story"}},
                      lambda n: "prompt_encoder" in n),
    "p_tuning": ({"name": "soft_prompt", "soft_prompt": {"method": "p_tuning", "num_virtual_tokens": 6}},
                 lambda n: "prompt_encoder" in n),
    "prefix_tuning": ({"name": "soft_prompt", "soft_prompt": {"method": "prefix_tuning", "num_virtual_tokens": 6}},
                      lambda n: "prompt_encoder" in n),
    "prompt_lm": ({"name": "prompt_lm", "soft_prompt": {"num_virtual_tokens": 6}}, lambda n: True),
    "freeze_layers": ({"name": "freeze", "freeze": {"trainable_layers": 2}},
                      lambda n: ".layers.3." in n or ".layers.4." in n),
    "freeze_modules": ({"name": "freeze", "freeze": {"modules": ["model.layers.*.mlp"]}}, lambda n: ".mlp." in n),
}


def _train(tmp_path, stories260k, strategy, name="run", **sections):
    train = sections.pop("train", {})
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / name,
                       strategy=strategy, train={"max_steps": 3, "learning_rate": 1e-2, "batch_size": 4, **train},
                       **sections)
    return loop.train(validate_config(tree))


def _fresh(stories260k, strategy):
    cfg = validate_config(config_tree(stories260k, "x.jsonl", "o", strategy=strategy))
    seed_everything(0)
    tok = load_tokenizer(cfg.model)
    return prepare_strategy(load_model(cfg.model), cfg.strategy, tok, 0)


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_intended_parameters_change_and_final_reloads(tmp_path, stories260k, case):
    strategy, must_change = CASES[case]
    before = {n: p.detach().clone() for n, p in _fresh(stories260k, strategy).named_parameters()}
    result = _train(tmp_path, stories260k, strategy)
    after = dict(result.model.named_parameters())
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    intended = {n for n in before if must_change(n)}
    assert intended, case
    assert changed == intended, (sorted(changed ^ intended)[:5], case)
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable == intended

    params = read_metrics(result.run_dir / "metrics.jsonl")[0]
    assert params["trainable_params"] == sum(after[n].numel() for n in intended)
    assert params["total_params"] == count_parameters(result.model).total

    # final/ reloads with plain transformers/peft and gives the logits of the model in memory
    trained = result.model.lm.eval()
    reloaded = load_final(result.final_dir).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 432]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    files = {p.name for p in result.final_dir.rglob("*")}
    if result.model.is_peft:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    if case == "prompt_lm":
        assert (result.final_dir / "base" / "model.safetensors").is_file()
    if not result.model.is_peft:
        assert "model.safetensors" in files


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_soft_prompt_loss_equals_peft_and_packed_equals_padded(stories260k, tokenizer, method):
    from tests.data.test_encode_labels import _encode
    from tunelab.data.batching import pack_best_fit, packed_collate, pad_collate
    from tunelab.train.loss import causal_lm_loss

    tm = _fresh(stories260k, {"name": "soft_prompt", "soft_prompt": {"method": method, "num_virtual_tokens": 5}})
    encoded = _encode(VARIED_ROWS[:6], tokenizer)[2]
    v = tm.virtual_tokens
    padded = pad_collate(encoded, tokenizer.eos_token_id, v)
    ours = causal_lm_loss(tm, padded)
    # peft's own forward on the plain padded batch is the reference
    plain = pad_collate(encoded, tokenizer.eos_token_id)
    reference = tm.lm(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"], labels=plain["labels"]).loss
    torch.testing.assert_close(ours.loss_sum / ours.num_label_tokens, reference)
    if not tm.can_pack:
        assert method == "prefix_tuning"
        return
    bins = pack_best_fit([len(e.input_ids) + v for e in encoded], 256)
    assert any(len(b) > 1 for b in bins)
    packed = packed_collate([[encoded[i] for i in b] for b in bins], tokenizer.eos_token_id, 256, v)
    packed_loss = causal_lm_loss(tm, packed)
    torch.testing.assert_close(packed_loss.loss_sum, ours.loss_sum)
    grads = []
    for loss in (ours.loss_sum, causal_lm_loss(tm, packed).loss_sum):
        tm.zero_grad()
        loss.backward()
        grads.append(tm.lm.prompt_encoder.default.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_packed_soft_prompt_run_and_prefix_fallback(tmp_path, stories260k, caplog):
    packed = {"data": {"max_length": 128}, "train": {"tokens_per_step": 256, "max_steps": 2}}
    run = _train(tmp_path, stories260k, {"name": "soft_prompt"}, name="pt", **packed)
    assert run.steps == 2
    with caplog.at_level(logging.INFO, logger="tunelab"):
        _train(tmp_path, stories260k, {"name": "soft_prompt", "soft_prompt": {"method": "prefix_tuning"}},
               name="prefix", **packed)
    assert "cannot see packed rows: using padded batches" in caplog.text


@pytest.mark.parametrize("strategy", [{"name": "lora", "lora": {"dropout": 0.0}},
                                      {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 4}}])
def test_resume_for_adapter_strategies(tmp_path, stories260k, monkeypatch, strategy):
    train = {"max_steps": 4, "save_every": 2}
    whole = _train(tmp_path, stories260k, strategy, name="whole", train=train)
    restore = crash_after_saving(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        _train(tmp_path, stories260k, strategy, name="resumed", train=train)
    restore()
    resumed = _train(tmp_path, stories260k, strategy, name="resumed", train=train, resume=True)
    losses = [[r["loss"] for r in read_metrics(x.run_dir / "metrics.jsonl") if r["type"] == "train"]
              for x in (whole, resumed)]
    assert losses[0] == losses[1]
    for (n, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_export_merge_gives_the_adapter_logits(tmp_path, stories260k, variant):
    from transformers import AutoModelForCausalLM

    result = _train(tmp_path, stories260k, {"name": "lora", "lora": {"variant": variant, "dropout": 0.0}})
    message = export_run(result.run_dir, tmp_path / "merged", merge=True)
    assert "merged" in message
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, result.model.lm.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_export_explains_why_a_soft_prompt_cannot_merge(tmp_path, stories260k):
    result = _train(tmp_path, stories260k, {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 4}})
    message = export_run(result.run_dir, tmp_path / "out", merge=True)
    assert "cannot be merged" in message and "virtual tokens" in message
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_prompting_trains_nothing_and_still_evaluates(tmp_path, stories260k):
    result = _train(tmp_path, stories260k, {"name": "prompting", "template": TEMPLATE, "num_shots": 2},
                    data={"eval_fraction": 0.25}, train={"max_steps": None})
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[0]["trainable_params"] == 0 and rows[0]["total_params"] == 260_032
    assert rows[1]["type"] == "eval" and rows[1]["eval_loss"] > 0
    assert result.final_dir is None and not (result.run_dir / "final").exists()


def test_bad_combinations_name_what_exists(tmp_path, stories260k):
    with pytest.raises(ConfigError, match=r"match no linear module.*down_proj, gate_proj, k_proj"):
        _fresh(stories260k, {"name": "lora", "lora": {"target_modules": ["query", "value"]}})
    with pytest.raises(ConfigError, match="trainable_layers is 9 but the model has 5 decoder layers"):
        _fresh(stories260k, {"name": "freeze", "freeze": {"trainable_layers": 9}})
    with pytest.raises(ConfigError, match="matches no parameter"):
        _fresh(stories260k, {"name": "freeze", "freeze": {"modules": ["model.nothing.*"]}})
    with pytest.raises(ValueError, match="fixed_prompt tunes the LM under a fixed discrete prompt"):
        StrategyConfig(name="fixed_prompt")
