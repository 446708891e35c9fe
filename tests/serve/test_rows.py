"""A streamed answer joins up to exactly the final text, whatever the tokens: the deltas only ever extend what was
sent, through byte-fallback runs that are not valid UTF-8 yet, incomplete characters and half-written stop texts."""

from __future__ import annotations

import random

from tunelab.evaluate.generate import Decoding
from tunelab.serve.rows import Row, byte_token_ids


def _stream(tokenizer, tokens, stop=(), ends=(), stop_ids=(), max_tokens=10_000):
    row = Row(tokenizer, Decoding({}, list(stop_ids), list(ends)), max_tokens, list(stop))
    sent = ""
    for token in tokens:
        sent += row.add(token)
        if row.finished:
            break
    result = row.result()
    return sent, row.rest(result), result, row


def test_streamed_text_joins_to_the_final_text(tokenizer):
    byte_ids = sorted(byte_token_ids(tokenizer))
    assert len(byte_ids) == 256  # stories260K's SentencePiece vocabulary falls back to bytes
    rng = random.Random(0)
    vocab = list(range(tokenizer.vocab_size))
    for _ in range(300):  # words, and bytes that form valid UTF-8 or not
        tokens = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.choice(vocab) for _ in range(rng.randint(1, 20))]
        sent, rest, result, _ = _stream(tokenizer, tokens)
        assert result.text.startswith(sent) and sent + rest == result.text, tokens
    ascii_then_invalid = tokenizer.convert_tokens_to_ids(["<0x38>", "<0x24>", "<0x24>", "<0xE2>", "<0x41>"])
    sent, rest, result, _ = _stream(tokenizer, ascii_then_invalid)
    assert sent + rest == result.text and "\ufffd" in result.text


def test_stop_texts_are_held_back_and_end_the_row(tokenizer):
    words = tokenizer("Once upon a time there was a dog", add_special_tokens=False)["input_ids"]
    sent, rest, result, row = _stream(tokenizer, words, stop=["there w"])
    assert row.finished and result.text == "Once upon a time " and sent + rest == result.text
    assert "there" not in sent  # never streamed, though the stop text completed only later
    sent, rest, result, row = _stream(tokenizer, words, max_tokens=3)
    assert len(row.tokens) == 3 and row.finish_reason(result) == "length"
    eos = tokenizer.eos_token_id
    sent, rest, result, row = _stream(tokenizer, [*words[:2], eos, *words[2:]], stop_ids=[eos])
    assert row.tokens[-1] == eos and result.ended_with_eos and row.finish_reason(result) == "stop"
    assert sent + rest == tokenizer.decode(words[:2], skip_special_tokens=True)
