"""How a training step is assembled from the data: padded examples or packed token-budget rows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.config import Config
from tunelab.data.batching import Unit, UnitStream, packed_collate, packed_rows, pad_collate, shuffled_examples
from tunelab.data.encode import Encoded

log = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """A stream of rows and how many rows make a micro-batch and how many micro-batches a step."""

    stream: UnitStream
    rows_per_micro_batch: int
    micro_batches_per_step: int
    collate: Callable[[list[Unit]], dict[str, torch.Tensor]]
    packed: bool
    lengths: list[int]  # tokens of each example

    def next_step(self) -> list[tuple[dict[str, torch.Tensor], int]]:
        """The micro-batches of the next optimizer step, each with its number of real (non-pad) tokens."""
        out = []
        for _ in range(self.micro_batches_per_step):
            units = self.stream.take(self.rows_per_micro_batch)
            out.append((self.collate(units), sum(self.lengths[i] for unit in units for i in unit)))
        return out

    def steps_per_epoch(self) -> float:
        return len(self.stream.units(0)) / (self.rows_per_micro_batch * self.micro_batches_per_step)


def make_batch_plan(cfg: Config, examples: list[Encoded], pad_id: int, can_pack: bool = True) -> BatchPlan:
    """Padded batches of `train.batch_size`, or packed rows when `train.tokens_per_step` is set."""
    t, row_length = cfg.train, cfg.data.max_length
    lengths = [len(e.input_ids) for e in examples]

    def padded(units: list[Unit]) -> dict[str, torch.Tensor]:
        return pad_collate([examples[i] for u in units for i in u], pad_id)

    if t.tokens_per_step is None:
        return BatchPlan(UnitStream(shuffled_examples(len(examples), t.seed)), t.batch_size, t.grad_accum,
                         padded, False, lengths)
    micro = t.tokens_per_micro_batch or t.tokens_per_step
    if not can_pack:
        per_micro = max(1, round(micro / (sum(lengths) / len(lengths))))
        log.info("this strategy cannot see packed rows: using padded batches of %d examples (the token budget "
                 "%d / the mean example length)", per_micro, micro)
        return BatchPlan(UnitStream(shuffled_examples(len(examples), t.seed)), per_micro, t.tokens_per_step // micro,
                         padded, False, lengths)
    return BatchPlan(UnitStream(packed_rows(lengths, row_length, t.seed)), micro // row_length,
                     t.tokens_per_step // micro,
                     lambda units: packed_collate([[examples[i] for i in u] for u in units], pad_id, row_length),
                     True, lengths)


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch()))
