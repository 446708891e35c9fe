"""Batched generation from rendered prompts: left padding, greedy or sampled, KV cache, stop at EOS
or at stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.batching import left_pad
from tunelab.data.encode import tokenize_texts
from tunelab.evaluate.loaders import EvalModel
from tunelab.errors import ModelError
from tunelab.models.load import pad_token_id, stop_token_ids


@dataclass
class Generation:
    text: str
    ended_with_eos: bool
    num_tokens: int


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids exactly as training tokenizes the start of an example (BOS where the tokenizer adds it)."""
    return tokenize_texts(tokenizer, prompts)[0]


def _generate_new_tokens(em: EvalModel, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any]
                         ) -> torch.Tensor:
    """TrainModel.generate_new_tokens; where an architecture cannot take a soft prompt's embeddings in generation,
    a clear error instead of a shape error from inside the model."""
    try:
        return em.model.generate_new_tokens(input_ids, mask, **kwargs)
    except RuntimeError as exc:
        if not em.model.virtual_tokens:
            raise
        raise ModelError(f"cannot generate with a soft prompt on '{em.model.config.model_type}' models ({exc}). "
                         "Score label options instead (tunelab eval --mode score), or train a strategy without "
                         "virtual tokens (lora, full).") from None


@dataclass
class Decoding:
    """How one batch is decoded: transformers' generate arguments, and what ends an answer (EOS, the model's end ids,
    the run's end of turn: one token as an id, several as stop text)."""
    kwargs: dict[str, Any]
    stop_ids: list[int]
    multi_token_ends: list[str]

    def finish(self, tokenizer: Any, tokens: list[int], stop_strings: list[str] | None = None) -> Generation:
        """A row's new tokens as the answer: cut at the first end id, then at an end of turn written as text and at
        the first stop string."""
        stops = [k for k, t in enumerate(tokens) if t in self.stop_ids]
        tokens = tokens[: stops[0]] if stops else tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        ended = bool(stops)
        for stop in self.multi_token_ends:
            if stop in text:
                text, ended = text[: text.index(stop)], True
        for stop in stop_strings or []:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return Generation(text, ended, len(tokens))


def decoding(em: EvalModel, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, streamer: Any = None) -> Decoding:
    """The generate arguments and end ids for `em`: every caller (generate, chat, serve) stops where training ended
    an answer."""
    tok = em.tokenizer
    pad_id = pad_token_id(tok)
    ends = [t for t in em.stop_texts if t]  # the run's end of turn (chat templates), besides EOS
    stop_ids = stop_token_ids(tok, em.model.base, ends)
    multi_token = [t for t in ends if len(tok(t, add_special_tokens=False)["input_ids"]) > 1]
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "eos_token_id": stop_ids,
              "pad_token_id": pad_id, "streamer": streamer}
    if multi_token:  # an end of turn written as text: transformers stops at it
        kwargs.update(stop_strings=multi_token, tokenizer=tok)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return Decoding(kwargs, stop_ids, multi_token)


def generate_batch(em: EvalModel, ids: list[list[int]], dec: Decoding, **extra: Any) -> torch.Tensor:
    """The new tokens (len(ids), new) of one left-padded batch of prompt ids; `extra` joins the generate arguments
    (a stopping criterion, a streamer)."""
    device = next(em.model.parameters()).device
    input_ids, mask = left_pad(ids, dec.kwargs["pad_token_id"])
    return _generate_new_tokens(em, input_ids.to(device), mask.to(device), {**dec.kwargs, **extra})


@torch.no_grad()
def generate(em: EvalModel, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] | None = None,
             batch_size: int = 16, seed: int = 0, streamer: Any = None) -> list[Generation]:
    """Continue each prompt; the text is cut at the first stop string. EOS, the model's own end ids and the run's
    end of turn always stop, and count as ending the answer (`ended_with_eos`). A transformers streamer (one prompt
    only) receives the tokens as they are generated."""
    dec = decoding(em, max_new_tokens, do_sample, temperature, top_p, streamer)
    ids = encode_prompts(em.tokenizer, prompts)
    torch.manual_seed(seed)
    out: list[Generation | None] = [None] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        new = generate_batch(em, [ids[i] for i in chunk], dec)
        for row, i in enumerate(chunk):
            out[i] = dec.finish(em.tokenizer, new[row].tolist(), stop_strings)
    return out  # type: ignore[return-value]
