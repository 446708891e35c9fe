"""Batches of encoded examples, in a seeded order that can be resumed mid-epoch.

Two batchings: padded (a fixed number of examples per micro-batch, right-padded) and packed
(examples packed by best-fit-decreasing into rows of `max_length` tokens, each example with its
own restarting position ids so that attention never crosses from one example to another).
"""

from __future__ import annotations

import bisect
import random
from array import array
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tunelab.data.encode import IGNORE, Encoded, example_lengths

Unit = list[int]  # the example indices of one batch row: one example (padded) or several (packed)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(sequences), longest): left padding, so that every sequence ends
    at the last column (where generation and next-token scoring continue)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def pad_collate(examples: Sequence[Encoded], pad_id: int, virtual_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Returns input_ids, labels, attention_mask, each (batch, seq).

    With `virtual_tokens` > 0 every row starts with that many slots for a soft prompt, marked
    in `virtual_mask` (their ids are padding; the model puts the prompt's embeddings there).
    """
    v = virtual_tokens
    width = v + max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, v : v + n] = torch.tensor(e.input_ids)
        labels[i, v : v + n] = torch.tensor(e.labels)
        mask[i, : v + n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if v:
        batch["virtual_mask"] = torch.zeros((len(examples), width), dtype=torch.bool)
        batch["virtual_mask"][:, :v] = True
    return batch


def packed_collate(rows: list[list[Encoded]], pad_id: int, row_length: int,
                   virtual_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed examples, each padded to `row_length`. Returns input_ids, labels, position_ids.

    Positions restart at 0 for every example (and for the padding at the end of a row), which is
    how transformers recognises packed sequences and builds a block-diagonal causal mask. An
    example's first label is ignored: nothing of its own precedes it. With `virtual_tokens`,
    each example is preceded by that many soft-prompt slots (`virtual_mask`), as in `pad_collate`.
    """
    v = virtual_tokens
    ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), row_length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), row_length), dtype=torch.long)
    slots = torch.zeros((len(rows), row_length), dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            slots[r, start : start + v] = True
            ids[r, start + v : start + v + n] = torch.tensor(e.input_ids)
            labels[r, start + v + 1 : start + v + n] = torch.tensor(e.labels[1:])
            positions[r, start : start + v + n] = torch.arange(v + n)
            start += v + n
        assert start <= row_length, "a packed row overflows its length"
        positions[r, start:] = torch.arange(row_length - start)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if v:
        batch["virtual_mask"] = slots
    return batch


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: group indices into bins of total length <= capacity.

    Longest first, each into the open bin with the least room that still fits it. Equal lengths
    keep their input order, so shuffling the input varies the bins from epoch to epoch.
    """
    units = _best_fit_units(np.asarray(lengths, dtype=np.int64), capacity)
    return [units[b] for b in range(len(units))]


def _best_fit_units(lengths: np.ndarray, capacity: int) -> Units:
    """`pack_best_fit` as compact rows: each bin's indices in the order they were placed."""
    order = np.argsort(-lengths, kind="stable")  # longest first; equal lengths in input order
    bin_of = np.empty(len(order), dtype=np.int64)  # the bin of the k-th placed example
    by_room: dict[int, array[int]] = {}  # remaining room -> bins with exactly that room (8 bytes a bin)
    rooms: list[int] = []  # sorted distinct rooms that have at least one bin
    num_bins = 0
    for k, n in enumerate(lengths[order].tolist()):
        if n > capacity:
            raise ValueError(f"an example of {n} tokens cannot be packed into rows of {capacity}")
        r = bisect.bisect_left(rooms, n)
        if r < len(rooms):
            room = rooms[r]
            b = by_room[room].pop()
            if not by_room[room]:
                rooms.pop(r)
        else:
            room, b = capacity, num_bins
            num_bins += 1
        bin_of[k] = b
        left = room - n
        if not by_room.get(left):
            bisect.insort(rooms, left)
            by_room[left] = array("q")
        by_room[left].append(b)
    placed = np.argsort(bin_of, kind="stable")  # by bin, each bin's examples in the order they were placed
    return Units(order[placed], np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=num_bins))]))


class Units(Sequence[Unit]):
    """Batch rows held compactly (a flat index array and each row's start): a million rows cost two arrays,
    not a million lists. Indexing gives a row as a list of example indices."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray) -> None:
        self.flat, self.starts = flat, starts

    @classmethod
    def singles(cls, order: np.ndarray) -> Units:
        """One example per row, in `order`."""
        return cls(np.asarray(order, dtype=np.int64), np.arange(len(order) + 1))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.flat[self.starts[i] : self.starts[i + 1]].tolist()

    def __iter__(self) -> Iterator[Unit]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Units):
            return bool(np.array_equal(self.starts, other.starts) and np.array_equal(self.flat, other.flat))
        return list(self) == list(other) if isinstance(other, (list, tuple)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def permuted(self, perm: Any) -> Units:
        """The rows in the order `perm` gives (row k of the result is row perm[k])."""
        p = np.asarray(perm, dtype=np.int64)
        counts = np.diff(self.starts)[p]
        starts = np.concatenate([[0], np.cumsum(counts)])
        flat = self.flat[np.repeat(self.starts[p] - starts[:-1], counts) + np.arange(starts[-1])]
        return Units(flat, starts)

    def mapped(self, through: np.ndarray) -> Units:
        """The same rows with each index i replaced by through[i]."""
        return Units(through[self.flat], self.starts)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens the shifted loss counts in a (batch, seq) label tensor."""
    return int((labels[:, 1:] != IGNORE).sum())


@dataclass
class DataPosition:
    """Where the stream stands: the epoch and the index of the next unit in its order."""

    epoch: int = 0
    index: int = 0


class UnitStream:
    """An endless stream of batch rows, re-ordered every epoch by a seeded function; resumable."""

    def __init__(self, epoch_units: Callable[[int], Sequence[Unit]]):
        self.epoch_units = epoch_units
        self.position = DataPosition()
        self._cache: tuple[int, Sequence[Unit]] | None = None

    def units(self, epoch: int) -> Sequence[Unit]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_units(epoch))
        return self._cache[1]

    def take(self, n: int) -> list[Unit]:
        """The next n units, moving into the next epoch when this one runs out."""
        out: list[Unit] = []
        while len(out) < n:
            units = self.units(self.position.epoch)
            chunk = units[self.position.index : self.position.index + n - len(out)]
            out.extend(chunk)
            self.position.index += len(chunk)
            if self.position.index >= len(units):
                self.position = DataPosition(self.position.epoch + 1, 0)
        return out

    def epochs_done(self) -> float:
        return self.position.epoch + self.position.index / len(self.units(self.position.epoch))


def shuffled_examples(num_examples: int, seed: int) -> Callable[[int], Units]:
    """Padded batching: every example is its own row, in a fresh seeded order each epoch."""
    def units(epoch: int) -> Units:
        order = array("q", range(num_examples))  # 8 bytes an example; the same permutation as a shuffled list
        random.Random(seed * 100_003 + epoch).shuffle(order)
        return Units.singles(np.frombuffer(order, dtype=np.int64))
    return units


def packed_rows(lengths: Sequence[int], capacity: int, seed: int) -> Callable[[int], Units]:
    """Packed batching: each epoch shuffles the examples, packs them best-fit-decreasing, shuffles the rows."""
    all_lengths = np.asarray(lengths, dtype=np.int64)

    def units(epoch: int) -> Units:
        rng = random.Random(seed * 100_003 + epoch)
        order = array("q", range(len(all_lengths)))  # 8 bytes an example; the same permutation as a shuffled list
        rng.shuffle(order)
        shuffled = np.frombuffer(order, dtype=np.int64)
        rows = _best_fit_units(all_lengths[shuffled], capacity).mapped(shuffled)
        perm = array("q", range(len(rows)))
        rng.shuffle(perm)  # the permutation that shuffling the rows themselves would apply
        return rows.permuted(np.frombuffer(perm, dtype=np.int64))
    return units


def eval_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int,
                 virtual_tokens: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Eval micro-batches in length order (less padding); the order does not change the token-summed loss."""
    lengths = example_lengths(examples)
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        yield pad_collate([examples[i] for i in order[s : s + batch_size]], pad_id, virtual_tokens)
