"""Log-likelihood scoring: per-sequence log-probabilities of labeled tokens, and ranking of label
options, so that a small model's tuning-free prompting is measured fairly (no free-text parsing)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from tunelab.data.batching import pad_collate
from tunelab.data.encode import IGNORE, EncodeStats, Encoded, encode_examples
from tunelab.data.records import SHAPES, Example
from tunelab.data.render import RenderSpec, render_example
from tunelab.strategies.model import TrainModel


def label_log_probs(model: TrainModel, batch: dict[str, torch.Tensor], chunk: int = 1024
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For the labeled positions of a batch, in row-major order, yield chunks of
    (log-probabilities over the vocabulary (n, vocab), the label ids (n,), the row of each (n,))."""
    hidden, labels = model.hidden_states(batch)
    labels = labels[:, 1:]
    mask = labels != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    selected, targets = hidden[:, :-1][mask], labels[mask]
    head = model.head
    for s in range(0, targets.shape[0], chunk):
        logits = head(selected[s : s + chunk]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield F.log_softmax(logits, dim=-1), targets[s : s + chunk], rows[s : s + chunk]


@torch.no_grad()
def sequence_log_probs(model: TrainModel, encoded: list[Encoded], pad_id: int, batch_size: int = 32
                       ) -> list[tuple[float, int]]:
    """(summed log-probability of the labeled tokens, their number) for each encoded sequence."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for s in range(0, len(encoded), batch_size):
        part = encoded[s : s + batch_size]
        batch = {k: v.to(device) for k, v in pad_collate(part, pad_id, model.virtual_tokens).items()}
        sums = torch.zeros(len(part), dtype=torch.float64, device=device)
        counts = torch.zeros(len(part), dtype=torch.long, device=device)
        for logp, targets, rows in label_log_probs(model, batch):
            sums.index_add_(0, rows, logp.gather(1, targets[:, None]).squeeze(1).double())
            counts.index_add_(0, rows, torch.ones_like(rows))
        out.extend(zip(sums.tolist(), counts.tolist()))
    return out


def with_target(ex: Example, target: str) -> Example:
    """A copy of `ex` whose target is `target` (for scoring the options of a classification)."""
    fields = dict(ex.fields)
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scored = sequence_log_probs(model, encoded, pad_id, batch_size)
    results = []
    for i in range(len(examples)):
        scores = [total / max(1, n) for total, n in scored[i * len(options) : (i + 1) * len(options)]]
        results.append((options[max(range(len(options)), key=scores.__getitem__)], scores))
    return results
