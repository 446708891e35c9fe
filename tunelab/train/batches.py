"""How a training step is assembled from the data: padded examples or packed token-budget rows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import torch

from tunelab.config import Config
from tunelab.data.batching import UnitStream, packed_collate, packed_rows, pad_collate, shuffled_examples
from tunelab.data.encode import Encoded, example_lengths
from tunelab.data.streaming import StreamingUnits

log = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """A stream of rows and how many rows make a micro-batch and how many micro-batches a step."""

    stream: UnitStream | StreamingUnits
    rows_per_micro_batch: int
    micro_batches_per_step: int
    examples: Callable[[Any], list[Encoded]]  # a row of the stream -> its examples
    pad_id: int
    row_length: int  # tokens of a packed row: data.max_length and the soft-prompt slots
    virtual_tokens: int = 0
    packed: bool = False  # rows hold several examples each (else one example, padded)
    rank: int = 0
    world: int = 1

    def next_step(self) -> list[tuple[dict[str, torch.Tensor], int]]:
        """This rank's micro-batches of the next optimizer step, each with its number of real (non-pad) tokens.

        Every rank draws the same global micro-batch from the same seeded stream and keeps its own
        contiguous slice, so N processes see exactly the examples of one process with N times the batch.
        """
        out = []
        for _ in range(self.micro_batches_per_step):
            units = self.stream.take(self.rows_per_micro_batch * self.world)
            units = units[self.rank * self.rows_per_micro_batch : (self.rank + 1) * self.rows_per_micro_batch]
            rows = [self.examples(u) for u in units]
            out.append((self.collate(rows), sum(len(e.input_ids) for row in rows for e in row)))
        return out

    def collate(self, rows: list[list[Encoded]]) -> dict[str, torch.Tensor]:
        if self.packed:
            return packed_collate(rows, self.pad_id, self.row_length, self.virtual_tokens)
        return pad_collate([e for row in rows for e in row], self.pad_id, self.virtual_tokens)

    def steps_per_epoch(self) -> float:
        assert isinstance(self.stream, UnitStream), "a streamed epoch has no length known in advance"
        return len(self.stream.units(0)) / (self.rows_per_micro_batch * self.micro_batches_per_step * self.world)


def make_batch_plan(cfg: Config, examples: Sequence[Encoded], pad_id: int, can_pack: bool = True,
                    virtual_tokens: int = 0, rank: int = 0, world: int = 1, why_not_packed: str | None = None,
                    stream: StreamingUnits | None = None) -> BatchPlan:
    """Padded batches of `train.batch_size`, or packed rows when `train.tokens_per_step` is set.

    `virtual_tokens` soft-prompt slots precede every example (they count against a row's length);
    `why_not_packed` says, in the log, why a model that cannot see packed rows gets padded batches. With a
    `stream` (data.streaming), the rows come from it; `examples` (its first buffer) sizes the batches.
    """
    plan = _plan(cfg, examples, pad_id, can_pack, virtual_tokens, why_not_packed)
    plan.rank, plan.world = rank, world
    if stream is not None:  # the same shape of batches, their rows read from the file as training goes
        stream.batch_as(plan.row_length if plan.packed else None, virtual_tokens)
        plan.stream, plan.examples = stream, list  # a streamed row holds its examples
        return plan
    per_step = plan.rows_per_micro_batch * world
    if per_step > len(plan.stream.units(0)):
        from tunelab.errors import ConfigError

        raise ConfigError(f"{world} processes x {plan.rows_per_micro_batch} rows per micro-batch need {per_step} rows "
                          f"per micro-batch, but the training data make only {len(plan.stream.units(0))} per epoch: "
                          "there is not enough work. Use fewer processes or a smaller batch.")
    return plan


def _plan(cfg: Config, examples: Sequence[Encoded], pad_id: int, can_pack: bool, virtual_tokens: int,
          why_not_packed: str | None = None) -> BatchPlan:
    t, v = cfg.train, virtual_tokens
    row_length = cfg.data.max_length + v
    lengths = example_lengths(examples)

    def plan(stream: UnitStream, rows_per_micro_batch: int, micro_batches: int, packed: bool = False) -> BatchPlan:
        return BatchPlan(stream, rows_per_micro_batch, micro_batches, lambda unit: [examples[i] for i in unit],
                         pad_id, row_length, v, packed)

    if t.tokens_per_step is None:
        return plan(UnitStream(shuffled_examples(len(examples), t.seed)), t.batch_size, t.grad_accum)
    micro = t.tokens_per_micro_batch or t.tokens_per_step
    if not can_pack:
        per_micro = max(1, round(micro / (sum(lengths) / len(lengths))))
        log.info("%s, so this run cannot see packed rows: using padded batches of %d examples (the token budget %d "
                 "/ the mean example length)", why_not_packed or "by its strategy", per_micro, micro)
        return plan(UnitStream(shuffled_examples(len(examples), t.seed)), per_micro, t.tokens_per_step // micro)
    return plan(UnitStream(packed_rows([n + v for n in lengths], row_length, t.seed)),
                max(1, micro // row_length), t.tokens_per_step // micro, packed=True)


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch()))
