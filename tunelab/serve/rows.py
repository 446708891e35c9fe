"""One request's answer as it is generated: its tokens, the text safe to stream so far, and why it ended.

The final text is evaluate/'s (`Decoding.finish` over the row's tokens), so a streamed answer joins up to exactly
what `tunelab generate` writes; deltas only ever extend what was sent, holding back an incomplete UTF-8 character
and any tail that may still turn out to be the start of a stop text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tunelab.evaluate.generate import Decoding, Generation


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback: one UTF-8 byte per token


@lru_cache(maxsize=16)
def byte_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of byte-fallback tokens. A run of them decodes as one UTF-8 string, or as one U+FFFD per byte when the
    run is not valid UTF-8 yet, so the text of a trailing run can still change with the next token."""
    return frozenset(i for piece, i in tokenizer.get_vocab().items() if BYTE_PIECE.fullmatch(piece))


@dataclass
class Row:
    tokenizer: Any
    decoding: Decoding
    max_tokens: int
    stop: list[str]  # the request's stop strings
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # the text streamed so far
    finished: bool = False

    @property
    def stop_texts(self) -> list[str]:
        return [t for t in [*self.decoding.multi_token_ends, *self.stop] if t]

    def add(self, token: int) -> str:
        """Take one generated token; returns the text to stream now ('' while held back)."""
        if self.finished:
            return ""
        self.tokens.append(token)
        if token in self.decoding.stop_ids or len(self.tokens) >= self.max_tokens:
            self.finished = True
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if any(stop in text for stop in self.stop_texts):
            self.finished = True
            return ""
        safe = self._settled_text().rstrip("\ufffd")  # an incomplete UTF-8 character decodes as U+FFFD until complete
        safe = safe[: len(safe) - self._held_back(safe)]
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def _settled_text(self) -> str:
        """The text of the tokens before a trailing run of byte tokens (whose text may still change)."""
        byte_ids, end = byte_token_ids(self.tokenizer), len(self.tokens)
        while end and self.tokens[end - 1] in byte_ids:
            end -= 1
        return self.tokenizer.decode(self.tokens[:end], skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop text (it may complete on a later token)."""
        longest = 0
        for stop in self.stop_texts:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def result(self) -> Generation:
        """The answer as `tunelab generate` gives it for these tokens."""
        return self.decoding.finish(self.tokenizer, self.tokens, self.stop)

    def finish_reason(self, result: Generation) -> str:
        """OpenAI's: 'stop' at an end id, end of turn or stop string; 'length' at max_tokens."""
        if result.ended_with_eos or any(stop and stop in self.tokenizer.decode(self.tokens, skip_special_tokens=True)
                                        for stop in self.stop):
            return "stop"
        return "length"

    def rest(self, result: Generation) -> str:
        """What remains to stream of the final text."""
        return result.text[len(self.sent):] if result.text.startswith(self.sent) else ""
