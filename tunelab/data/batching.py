"""Batches of encoded examples, in a seeded order that can be resumed mid-epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from tunelab.data.encode import IGNORE, Encoded


def pad_collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Returns input_ids, labels, attention_mask, each (batch, seq)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens the shifted loss counts in a (batch, seq) label tensor."""
    return int((labels[:, 1:] != IGNORE).sum())


@dataclass
class DataPosition:
    """Where the stream of examples stands: the epoch and the index within its shuffled order."""

    epoch: int = 0
    index: int = 0


class ExampleStream:
    """An endless, per-epoch reshuffled stream of example indices; `position` makes it resumable."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.position = DataPosition()

    def order(self, epoch: int) -> list[int]:
        idx = list(range(self.num_examples))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(idx)
        return idx

    def take(self, n: int) -> list[int]:
        """The next n indices, moving into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < n:
            order = self.order(self.position.epoch)
            chunk = order[self.position.index : self.position.index + n - len(out)]
            out.extend(chunk)
            self.position.index += len(chunk)
            if self.position.index >= self.num_examples:
                self.position = DataPosition(self.position.epoch + 1, 0)
        return out

    def epochs_done(self) -> float:
        return self.position.epoch + self.position.index / self.num_examples


def eval_batches(examples: list[Encoded], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Eval micro-batches in length order (less padding); the order does not change the token-summed loss."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        yield pad_collate([examples[i] for i in order[s : s + batch_size]], pad_id)
