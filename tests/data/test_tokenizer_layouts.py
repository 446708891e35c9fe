"""The ids of a prompt/completion example are what the tokenizer gives for the whole text with its own special-token
handling, for a SentencePiece-style tokenizer that adds BOS (Llama 2 / Mistral layout: Metaspace, the first word
opened with its space marker) and a byte-level BPE without BOS (GPT-2 / Qwen layout); prompts for generation are
the training ids' prefix. Both tokenizers are trained here with the `tokenizers` library."""

from __future__ import annotations

import pytest
from tests import tokenizer_layouts as layouts
from tests.data.test_encode_labels import _encode, _labeled_runs
from tunelab.evaluate.generate import encode_prompts

ROW = {"prompt": "How are you today?", "completion": " Fine, thank you."}


def sentencepiece_style():
    return layouts.sentencepiece_style("<s>", "</s>", "<unk>", vocab_size=300)


def byte_level():
    return layouts.byte_level("<|endoftext|>")


@pytest.mark.parametrize("make", [sentencepiece_style, byte_level], ids=["sentencepiece", "byte_level_bpe"])
def test_ids_are_the_tokenizers_own_for_the_whole_text(make):
    tok = make()
    _, rendered, (enc,), _ = _encode([ROW], tok)
    text = rendered[0].text
    assert enc.input_ids == tok(text, add_special_tokens=True)["input_ids"]
    if tok.bos_token:  # the first word keeps its space marker after BOS
        assert tok.convert_ids_to_tokens(enc.input_ids)[:2] == ["<s>", "\u2581How"]
    assert _labeled_runs(enc, tok)[0].strip() == f"Fine, thank you.{tok.eos_token}"
    (prompt_ids,) = encode_prompts(tok, [rendered[0].prompt])
    first_trained = next(i for i, label in enumerate(enc.labels) if label != -100)
    assert prompt_ids == enc.input_ids[:first_trained]
