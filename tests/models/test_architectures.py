"""Architectures whose blocks, embeddings or attention differ from Llama's: tiny random models built from configs
(GPT-2 and Bloom keep their blocks in `transformer.h`; OPT-350m's embeddings are narrower than its hidden size;
Falcon and Bloom compute attention their own way, with ALiBi; Gemma 2 soft-caps attention logits).

For each: every strategy prepares with the planner's exact parameter count, a packed run trains (or, where packed
examples would attend to each other, falls back to padded batches and says why), and where rows are packed the
packed loss and gradients equal the padded ones and transformers' own loss."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import transformers as T

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.data.batching import pack_best_fit, packed_collate, pad_collate
from tunelab.data.dataset import load_datasets
from tunelab.data.render import spec_from_config
from tunelab.models.load import load_model, load_tokenizer
from tunelab.plan.estimate import model_shape
from tunelab.strategies.model import count_parameters
from tunelab.strategies.registry import parameter_counts
from tunelab.strategies.prepare import prepare_strategy
from tunelab.train.loop import train
from tunelab.train.loss import causal_lm_loss
from tunelab.runfiles import read_metrics

SPECIAL = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
ARCHITECTURES = {
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(n_embd=32, n_layer=3, n_head=4, **SPECIAL), True),
    "opt": (T.OPTForCausalLM, T.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                                          word_embed_proj_dim=16, pad_token_id=0, **SPECIAL), True),
    "falcon": (T.FalconForCausalLM, T.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                   **SPECIAL), False),
    "bloom": (T.BloomForCausalLM, T.BloomConfig(hidden_size=32, n_layer=3, n_head=4, **SPECIAL), False),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                   pad_token_id=0, **SPECIAL), True),
    # a sliding window shorter than the examples: packed rows must keep it (tunelab_varlen would not)
    "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                       sliding_window=8, query_pre_attn_scalar=8, pad_token_id=0,
                                                       **SPECIAL), True),
}
STRATEGIES = [{"name": "full"}, {"name": "lora"}, {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 4}},
              {"name": "soft_prompt", "soft_prompt": {"method": "p_tuning", "num_virtual_tokens": 4}},
              {"name": "prompt_lm", "soft_prompt": {"num_virtual_tokens": 4}},
              {"name": "freeze", "freeze": {"trainable_layers": 1}}]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory, stories260k):
    name = request.param
    cls, config, packs = ARCHITECTURES[name]
    out = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / f, out / f)
    return name, out, packs


def _cfg(tmp_path, model, strategy, **train):
    return validate_config(config_tree(model, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                                       strategy=strategy, train={"max_steps": 2, "batch_size": 4, **train}))


def test_every_strategy_prepares_with_the_planned_count(arch, tmp_path):
    name, model, _ = arch
    shape = model_shape(str(model))
    for strategy in STRATEGIES:
        cfg = _cfg(tmp_path, model, strategy)
        built = count_parameters(prepare_strategy(load_model(cfg.model), cfg.strategy, load_tokenizer(cfg.model)))
        assert parameter_counts(shape, cfg.strategy) == (built.trainable, built.total), (name, strategy)


@pytest.mark.parametrize("strategy", [{"name": "freeze", "freeze": {"trainable_layers": 1}},
                                      {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 4}}],
                         ids=["freeze", "soft_prompt"])
def test_a_packed_run_trains_or_says_why_it_cannot_pack(arch, tmp_path, caplog, strategy):
    name, model, packs = arch
    with caplog.at_level(logging.INFO, logger="tunelab"):
        train(_cfg(tmp_path, model, strategy, tokens_per_step=512, learning_rate=1e-2))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "final").is_dir()
    refused = "cannot see packed rows" in caplog.text
    assert refused == (not packs), caplog.text[-2000:]
    if refused:
        assert "compute attention their own way" in caplog.text


def test_packed_rows_equal_padded_and_transformers_loss(arch, tmp_path):
    name, model, packs = arch
    if not packs:
        pytest.skip(f"{name} is never packed (its attention ignores packed-example bounds)")
    cfg = _cfg(tmp_path, model, {"name": "full"})
    tokenizer = load_tokenizer(cfg.model)
    encoded = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, 0)[0].encoded[:12]
    bins = pack_best_fit([len(e.input_ids) for e in encoded], 128)
    assert any(len(b) > 1 for b in bins)
    packed = packed_collate([[encoded[i] for i in b] for b in bins], 0, 128)
    padded = pad_collate(encoded, 0)
    lm = load_model(cfg.model)  # the attention tunelab picks for the architecture
    reference = lm(**padded).loss  # transformers' own: mean over the labeled, shifted positions
    runs = []
    for batch in (padded, packed):
        lm.zero_grad()
        out = causal_lm_loss(lm, batch)
        (out.loss_sum / out.num_label_tokens).backward()
        runs.append((out.loss_sum / out.num_label_tokens, {n: p.grad.clone() for n, p in lm.named_parameters()
                                                           if p.grad is not None}))
    (loss_pad, g_pad), (loss_pack, g_pack) = runs
    torch.testing.assert_close(loss_pad.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_pack.detach(), loss_pad.detach(), rtol=1e-5, atol=1e-6)
    for n, g in g_pad.items():
        torch.testing.assert_close(g_pack[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_a_soft_prompt_starts_at_the_scale_of_real_token_embeddings(tmp_path, stories260k):
    """Gemma 3 multiplies token embeddings by sqrt(hidden) inside its embedding module: a soft prompt copied from the
    raw rows would start 1/sqrt(hidden) as large as the tokens beside it."""
    cls, config, _ = ARCHITECTURES["gemma3"]
    out = tmp_path / "gemma3"
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / f, out / f)
    cfg = _cfg(tmp_path, out, {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 4, "init_text": "Once"}})
    tokenizer = load_tokenizer(cfg.model)
    tm = prepare_strategy(load_model(cfg.model), cfg.strategy, tokenizer)
    prompt = tm.soft_prompt().detach()  # (virtual tokens, hidden)
    ids = tokenizer("Once", add_special_tokens=False)["input_ids"]
    embeddings = tm.base.get_input_embeddings()
    real = embeddings(torch.tensor(ids * 4)[:4]).detach()
    torch.testing.assert_close(prompt, real)
    raw = embeddings.weight[torch.tensor(ids)].detach()
    assert float(prompt[0].norm()) == pytest.approx(float(raw[0].norm()) * config.hidden_size ** 0.5, rel=1e-2)
