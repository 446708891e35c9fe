"""The llama2.c import reproduces the reference greedy output token for token."""

from __future__ import annotations

import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import shared_file
from tunelab.errors import ModelError
from tunelab.models.llama2c import convert_llama2c, read_checkpoint


def _oracle_text() -> str:
    """The reference continuation from llama2.c's stories260K.md (greedy, temperature 0)."""
    md = shared_file("stories260K/stories260K.md").read_text()
    block = md.split("-t 0.0\n", 1)[1].split("```", 1)[0]
    return block.rstrip("\n")


def test_greedy_from_bos_reproduces_the_oracle(stories260k):
    model = AutoModelForCausalLM.from_pretrained(stories260k)
    tok = AutoTokenizer.from_pretrained(stories260k)
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=200, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    generated = out[0, 1:].tolist()
    oracle = _oracle_text()
    assert oracle.startswith("Once upon a time, there was a little girl named Lily.")
    # decode: the 200 generated tokens are a prefix of the oracle text
    text = tok.decode(generated)
    assert len(text) > 400 and oracle.startswith(text), text
    # encode: the oracle text tokenizes to exactly the generated ids (token for token)
    expected_ids = tok(oracle, add_special_tokens=False)["input_ids"]
    assert expected_ids[:200] == generated


def test_tokenizer_round_trips_and_falls_back_to_bytes(stories260k):
    tok = AutoTokenizer.from_pretrained(stories260k)
    for text in ["Hello world", "café ☕ 42\nnew line", "  two  spaces", "card_arrival"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2


def test_config_matches_the_header(stories260k):
    model = AutoModelForCausalLM.from_pretrained(stories260k)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (64, 172, 5, 8, 4, 512)
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 260_032


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\0" * 100)
    with pytest.raises(ModelError, match="truncated"):
        read_checkpoint(bad)
    with pytest.raises(ModelError, match="does not exist"):
        convert_llama2c(tmp_path / "missing.bin", tmp_path / "tok.bin", tmp_path / "out")
