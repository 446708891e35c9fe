"""Log-likelihood scoring: per-sequence log-probabilities of labeled tokens, and ranking of label
options, so that a small model's tuning-free prompting is measured fairly (no free-text parsing)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from tunelab.data.batching import left_pad, pad_collate
from tunelab.data.encode import IGNORE, EncodeStats, Encoded, encode_examples
from tunelab.data.records import SHAPES, Example
from tunelab.data.render import RenderSpec, render_example
from tunelab.models.device import to_device
from tunelab.models.head import target_positions
from tunelab.models.load import cache_argument, pad_token_id
from tunelab.strategies.model import TrainModel


def label_log_probs(model: TrainModel, batch: dict[str, torch.Tensor], chunk: int = 1024
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For the labeled positions of a batch, in row-major order, yield chunks of
    (log-probabilities over the vocabulary (n, vocab), the label ids (n,), the row of each (n,)).
    The positions and the head are the training loss's, so these log-probabilities are its negative."""
    at = target_positions(*model.hidden_states(batch))
    head = model.head
    for s in range(0, at.targets.shape[0], chunk):
        logits = head.logits(at.hidden[s : s + chunk])
        yield F.log_softmax(logits.float(), dim=-1), at.targets[s : s + chunk], at.rows[s : s + chunk]


@torch.no_grad()
def sequence_log_probs(model: TrainModel, encoded: list[Encoded], pad_id: int, batch_size: int = 32
                       ) -> list[tuple[float, int]]:
    """(summed log-probability of the labeled tokens, their number) for each encoded sequence, in their order;
    batched in length order, so that a batch pads little."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for s in range(0, len(order), batch_size):
        part = order[s : s + batch_size]
        batch = to_device(pad_collate([encoded[i] for i in part], pad_id, model.virtual_tokens), device)
        sums = torch.zeros(len(part), dtype=torch.float64, device=device)
        counts = torch.zeros(len(part), dtype=torch.long, device=device)
        for logp, targets, rows in label_log_probs(model, batch):
            sums.index_add_(0, rows, logp.gather(1, targets[:, None]).squeeze(1).double())
            counts.index_add_(0, rows, torch.ones_like(rows))
        for i, result in zip(part, zip(sums.tolist(), counts.tolist())):
            out[i] = result
    return out


def _shared_prompt(model: TrainModel, group: list[Encoded]) -> tuple[list[int], list[list[int]]] | None:
    """The prompt ids all options of one example share, and each option's own ids; None when they differ."""
    if model.virtual_tokens or model.prefix:
        return None
    firsts = [next(i for i, t in enumerate(e.labels) if t != IGNORE) for e in group]
    prompt = group[0].input_ids[: firsts[0]]
    if not prompt or any(e.input_ids[:f] != prompt for e, f in zip(group, firsts)):
        return None
    return prompt, [e.input_ids[f:] for e, f in zip(group, firsts)]


@torch.no_grad()
def shared_prompt_log_probs(model: TrainModel, groups: list[tuple[list[int], list[list[int]]]], pad_id: int
                            ) -> list[list[tuple[float, int]]]:
    """Score the options of several examples: each prompt runs once (left-padded together), and its KV
    cache serves all of that example's options. Returns (summed log-probability, tokens) per option."""
    lm, device = model.base, next(model.parameters()).device
    n_opt = len(groups[0][1])
    ids, mask = (t.to(device) for t in left_pad([p for p, _ in groups], pad_id))
    plen = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    first_logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (examples, vocab): each option's first token
    cache.batch_repeat_interleave(n_opt)
    width = max(len(o) for _, opts in groups for o in opts)
    opt_ids = torch.full((len(groups) * n_opt, width), pad_id, dtype=torch.long, device=device)
    opt_mask = torch.zeros((len(groups) * n_opt, plen + width), dtype=torch.long, device=device)
    for i, (prompt, opts) in enumerate(groups):
        for j, o in enumerate(opts):
            r = i * n_opt + j
            opt_ids[r, : len(o)] = torch.tensor(o)
            opt_mask[r, plen - len(prompt) : plen + len(o)] = 1
    opt_pos = torch.tensor([len(p) for p, _ in groups], device=device).repeat_interleave(n_opt)[:, None] + \
        torch.arange(width, device=device)[None]
    logits = lm(input_ids=opt_ids, attention_mask=opt_mask, position_ids=opt_pos, **{cache_argument(lm): cache}).logits
    logp = F.log_softmax(logits.float(), dim=-1)  # (examples * options, width, vocab)
    results = []
    for i, (_, opts) in enumerate(groups):
        scores = []
        for j, o in enumerate(opts):
            r = i * n_opt + j
            rest = float(logp[r, : len(o) - 1].gather(1, opt_ids[r, 1 : len(o), None]).sum()) if len(o) > 1 else 0.0
            scores.append((float(first_logp[i, o[0]]) + rest, len(o)))
        results.append(scores)
    return results


def with_target(ex: Example, target: str) -> Example:
    """A copy of `ex` whose target is `target` (for scoring the options of a classification)."""
    fields = dict(ex.fields)
    if ex.shape == "chat":  # the last assistant turn is the target
        messages = [dict(m) for m in fields["messages"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages[last]["content"] = target
        fields["messages"] = messages
    else:
        fields[SHAPES[ex.shape][2]] = target
    return dataclasses.replace(ex, fields=fields)


def rank_options(model: TrainModel, tokenizer: Any, examples: list[Example], options: list[str],
                 spec: RenderSpec, pool: list[Example], max_length: int, batch_size: int = 64
                 ) -> list[tuple[str, list[float]]]:
    """For each example, the option with the highest mean log-probability per token (the option's
    tokens and its EOS, rendered exactly as a training target), and every option's score."""
    variants = [with_target(ex, opt) for ex in examples for opt in options]
    rendered = [render_example(v, spec, tokenizer, pool) for v in variants]
    encoded = encode_examples(rendered, tokenizer, max_length, "left", EncodeStats())
    assert len(encoded) == len(variants), "left truncation never drops an example"
    pad_id = pad_token_id(tokenizer)
    k = len(options)
    groups = [encoded[i * k : (i + 1) * k] for i in range(len(examples))]
    shared = [_shared_prompt(model, g) for g in groups]
    scored: list[list[tuple[float, int]] | None] = [None] * len(groups)
    ready = sorted((i for i, sh in enumerate(shared) if sh is not None), key=lambda i: len(shared[i][0]))  # by prompt
    per_call = max(1, batch_size * 4 // k)  # examples whose options fit one forward call
    for s in range(0, len(ready), per_call):
        part = ready[s : s + per_call]
        for i, result in zip(part, shared_prompt_log_probs(model, [shared[i] for i in part], pad_id)):
            scored[i] = result
    results = []
    for i in range(len(examples)):
        scores = [total / max(1, n) for total, n in (scored[i] or sequence_log_probs(model, groups[i], pad_id, batch_size))]
        results.append((options[max(range(len(options)), key=scores.__getitem__)], scores))
    return results
