"""Tokenizers in the layouts real families ship, trained here with the `tokenizers` library on a small corpus:
SentencePiece-style (Metaspace, BOS added by the post-processor: Llama 2, Mistral, Gemma, Phi-3) and byte-level BPE
(GPT-2, GPT-NeoX, Qwen, OLMo, Falcon, Cohere; BOS added only where the family adds one), each with the family's
special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["How are you today?", "Once upon a time there was a little cat.", "Fine, thank you.", "How do you do?",
          "The sky is blue and the grass is green.", "What colour is the sun? It is yellow.", "Hello there!",
          "See you tomorrow.", "Tell me a story about a dog."] * 40


def sentencepiece_style(bos: str, eos: str, unk: str, extra: list[str] = (), vocab_size: int = 320,
                        pad: str | None = None) -> PreTrainedTokenizerFast:
    specials = list(dict.fromkeys([unk, bos, eos, *([pad] if pad else []), *extra]))
    tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                   additional_special_tokens=list(extra))


def byte_level(eos: str, bos: str | None = None, extra: list[str] = (), vocab_size: int = 400,
               pad: str | None = None, add_bos: bool = False) -> PreTrainedTokenizerFast:
    specials = list(dict.fromkeys([eos, *([bos] if bos else []), *([pad] if pad else []), *extra]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=list(extra))
