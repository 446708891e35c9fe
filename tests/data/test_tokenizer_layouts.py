"""The ids of a prompt/completion example are what the tokenizer gives for the whole text with its own special-token
handling, for a SentencePiece-style tokenizer that adds BOS (Llama 2 / Mistral layout: Metaspace, the first word
opened with its space marker) and a byte-level BPE without BOS (GPT-2 / Qwen layout); prompts for generation are
the training ids' prefix. Both tokenizers are trained here with the `tokenizers` library."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from tests.data.test_encode_labels import _encode, _labeled_runs
from tunelab.evaluate.generate import encode_prompts

CORPUS = ["How are you today?", "Once upon a time there was a little cat.", "Fine, thank you.", "How do you do?"] * 50
ROW = {"prompt": "How are you today?", "completion": " Fine, thank you."}


def sentencepiece_style() -> LlamaTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False)


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


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
