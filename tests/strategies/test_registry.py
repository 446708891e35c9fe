"""Every entry of the strategy registry, read only through its fields: it trains what its fields say, the planner
counts its parameters exactly, final/ holds what `saves` says and evaluates, a strategy that keeps the base weights
leaves them bit for bit, and a mergeable one merges to the same logits. A new entry is tested here with no edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.evaluate.loaders import load_for_eval
from tunelab.evaluate.score import sequence_log_probs
from tunelab.models.load import load_model, load_tokenizer
from tunelab.plan.estimate import model_shape
from tunelab.export.hf import export_run
from tunelab.strategies.final import load_final
from tunelab.strategies.model import count_parameters
from tunelab.strategies.registry import STRATEGIES, parameter_counts, resolve
from tunelab.strategies.prepare import prepare_strategy
from tunelab.train import loop
from tunelab.train.session import seed_everything
from tunelab.runfiles import read_metrics


def _strategy_section(name: str) -> dict:
    s = STRATEGIES[name]
    section: dict = {"name": name}
    if s.requires_template:
        section["template"] = {"prompt": "Story: {prompt}\nEnd:", "target": "{completion}"}
    if s.base == "chosen":
        section["freeze"] = {"trainable_layers": 1}
    return section


def _cfg(tmp_path, stories260k, name):
    return validate_config(config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                                       strategy=_strategy_section(name),
                                       train={"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4}))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_registry_entry_does_what_its_fields_say(tmp_path, stories260k, name):
    cfg = _cfg(tmp_path, stories260k, name)
    s = resolve(cfg.strategy)
    seed_everything(0)
    prepared = prepare_strategy(load_model(cfg.model), cfg.strategy, load_tokenizer(cfg.model))
    built = count_parameters(prepared)
    assert parameter_counts(model_shape(str(stories260k)), cfg.strategy) == (built.trainable, built.total)
    base_trainable = [p.requires_grad for p in prepared.base.parameters() if p.numel()]
    added_trainable = [p.requires_grad for n, p in prepared.named_parameters() if "lora_" in n or "ia3_" in n or
                       "prompt_encoder" in n]
    if s.base == "all":
        assert all(base_trainable)
    elif s.base == "none":
        assert not any(p.requires_grad for n, p in prepared.base.named_parameters()
                       if "lora_" not in n and "ia3_" not in n)
    else:
        assert any(base_trainable) and not all(base_trainable)
    assert (s.adds != "nothing") == bool(added_trainable) and all(added_trainable)
    if s.adds == "adapter":
        peft_type = prepared.lm.peft_config[prepared.lm.active_adapter].peft_type
        assert str(getattr(peft_type, "value", peft_type)) == s.peft_type

    result = loop.train(cfg)
    run = Path(cfg.output_dir)
    final = run / "final"
    layout = {"nothing": not final.exists(), "model": (final / "config.json").is_file(),
              "adapter": (final / "adapter_config.json").is_file() and not (final / "config.json").exists(),
              "model+adapter": (final / "base" / "config.json").is_file() and (final / "adapter").is_dir()}
    assert layout[s.saves], (s.saves, sorted(p.name for p in run.iterdir()))
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[0]["trainable_params"] == (built.trainable if s.trains_anything else 0)

    em = load_for_eval(str(run))  # the run evaluates, whatever it saved
    tok = em.tokenizer
    from tunelab.data.encode import Encoded

    ids = tok("Once upon a time there was a cat.", add_special_tokens=False)["input_ids"]
    encoded = [Encoded(input_ids=ids, labels=[-100] + ids[1:], source="test", row=0)]
    ((logp, count),) = sequence_log_probs(em.model, encoded, tok.pad_token_id or 0)
    assert count == len(ids) - 1 and torch.isfinite(torch.tensor(logp))

    if s.trains_anything and s.keeps_base_weights:  # the base under the addition is bit for bit the base
        base = load_model(cfg.model)
        tuned_base = load_final(final).get_base_model()
        reference = dict(base.named_parameters())
        for n, p in tuned_base.named_parameters():
            if "lora_" in n or "ia3_" in n:
                continue
            key = n.replace(".base_layer", "")
            assert torch.equal(p, reference[key]), n
    if s.mergeable:
        out = tmp_path / "merged"
        export_run(run, out, merge=True)
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        adapter = load_final(final).eval()
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(merged(x).logits, adapter(x).logits, atol=1e-5, rtol=1e-5)
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    del result


def test_every_strategy_that_trains_names_its_learning_rates_for_the_advisor():
    from tunelab.plan.advisor import _lr

    for name, s in STRATEGIES.items():
        assert (s.learning_rates != "n/a") == s.trains_anything, name
        assert _lr(name) == s.learning_rates
