"""Sample predictions while training: a fixed set of held-out prompts, continued greedily every
`train.sample_every` steps, so that one can watch the answers change (samples.jsonl, the report).

The prompt ids are the encoded examples' own (everything before the first trained token), so they are
exactly what training conditions on; generation is batched and left-padded, one process only."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.batching import left_pad
from tunelab.data.encode import IGNORE, Encoded
from tunelab.models.load import stop_token_ids


def sample_examples(eval_set: list[Encoded] | None, train_set: list[Encoded], n: int) -> list[Encoded]:
    """The first `n` held-out examples (training examples when there is no eval data)."""
    return list((eval_set or train_set)[:n])


@torch.no_grad()
def sample_predictions(tm: Any, examples: list[Encoded], tokenizer: Any, pad_id: int, max_new_tokens: int,
                       step: int, device: torch.device, turn_end: str = "") -> list[dict[str, Any]]:
    """One row per example: step, index, prompt, reference (the trained tokens), prediction (greedy, ended by EOS,
    the model's end ids or the run's end of turn `turn_end`)."""
    was_training = tm.training
    tm.eval()
    prompts, refs = [], []
    for ex in examples:
        first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
        prompts.append(ex.input_ids[:first])
        refs.append([t for t in ex.labels if t != IGNORE])
    ids, mask = left_pad(prompts, pad_id)
    stop_ids = stop_token_ids(tokenizer, tm.base, [turn_end])
    new_tokens = tm.generate_new_tokens(ids.to(device), mask.to(device), do_sample=False,
                                        max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                        temperature=None, top_p=None, top_k=None, use_cache=True)
    tm.train(was_training)

    def text(tokens: list[int]) -> str:
        stops = [k for k, t in enumerate(tokens) if t in stop_ids]
        decoded = tokenizer.decode(tokens[: stops[0]] if stops else tokens, skip_special_tokens=True)
        return (decoded.split(turn_end)[0] if turn_end else decoded).strip()

    return [{"step": step, "index": i, "prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": text(ref),
             "prediction": text(new)} for i, (p, ref, new) in enumerate(zip(prompts, refs, new_tokens.tolist()))]
