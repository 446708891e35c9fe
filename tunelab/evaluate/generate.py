"""Batched generation from rendered prompts: left padding, greedy or sampled, KV cache, stop at EOS
or at stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.batching import left_pad
from tunelab.data.encode import adds_bos
from tunelab.evaluate.loaders import EvalModel
from tunelab.models.load import pad_token_id


@dataclass
class Generation:
    text: str
    ended_with_eos: bool
    num_tokens: int


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids exactly as training tokenizes the start of an example (BOS when the tokenizer adds it)."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None
    texts = [p if bos is None or p.startswith(bos) else bos + p for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(em: EvalModel, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] | None = None,
             batch_size: int = 16, seed: int = 0, streamer: Any = None) -> list[Generation]:
    """Continue each prompt; the text is cut at the first stop string (EOS always stops). A transformers
    streamer (one prompt only) receives the tokens as they are generated."""
    tok, lm = em.tokenizer, em.model.lm
    device = next(em.model.parameters()).device
    pad_id = pad_token_id(tok)
    ids = encode_prompts(tok, prompts)
    torch.manual_seed(seed)
    out: list[Generation | None] = [None] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        input_ids, mask = left_pad([ids[i] for i in chunk], pad_id)
        width = input_ids.shape[1]
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": pad_id, "streamer": streamer}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        generated = lm.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = generated[:, width:]  # generate returns the prompt, then the new tokens
        for row, i in enumerate(chunk):
            tokens = new[row].tolist()
            eos = tok.eos_token_id in tokens
            if eos:
                tokens = tokens[: tokens.index(tok.eos_token_id)]
            text = tok.decode(tokens, skip_special_tokens=True)
            for stop in stop_strings or []:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out[i] = Generation(text, eos, len(tokens))
    return out  # type: ignore[return-value]
