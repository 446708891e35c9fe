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


@torch.no_grad()
def generate(em: EvalModel, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] | None = None,
             batch_size: int = 16, seed: int = 0, streamer: Any = None) -> list[Generation]:
    """Continue each prompt; the text is cut at the first stop string. EOS, the model's own end ids and the run's
    end of turn always stop, and count as ending the answer (`ended_with_eos`). A transformers streamer (one prompt
    only) receives the tokens as they are generated."""
    tok = em.tokenizer
    device = next(em.model.parameters()).device
    pad_id = pad_token_id(tok)
    ends = [t for t in em.stop_texts if t]  # the run's end of turn (chat templates), besides EOS
    stop_ids = stop_token_ids(tok, em.model.base, ends)
    multi_token = [t for t in ends if len(tok(t, add_special_tokens=False)["input_ids"]) > 1]
    ids = encode_prompts(tok, prompts)
    torch.manual_seed(seed)
    out: list[Generation | None] = [None] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        input_ids, mask = left_pad([ids[i] for i in chunk], pad_id)
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "eos_token_id": stop_ids,
                  "pad_token_id": pad_id, "streamer": streamer}
        if multi_token:  # an end of turn written as text: transformers stops at it
            kwargs.update(stop_strings=multi_token, tokenizer=tok)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        new = _generate_new_tokens(em, input_ids.to(device), mask.to(device), kwargs)
        for row, i in enumerate(chunk):
            tokens = new[row].tolist()
            stops = [k for k, t in enumerate(tokens) if t in stop_ids]
            tokens = tokens[: stops[0]] if stops else tokens
            text = tok.decode(tokens, skip_special_tokens=True)
            ended = bool(stops)
            for stop in multi_token:
                if stop in text:
                    text, ended = text[: text.index(stop)], True
            for stop in stop_strings or []:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out[i] = Generation(text, ended, len(tokens))
    return out  # type: ignore[return-value]
