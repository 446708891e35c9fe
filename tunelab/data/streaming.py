"""`data.streaming: true`: the training file is read, encoded and batched as training goes, a buffer at a time.

For data that should not be held on disk twice. The file is cut into buffers of `data.shuffle_buffer` records in
file order; each buffer is rendered and tokenized, shuffled with the seed (and packed best-fit into rows when
`train.tokens_per_step` is set), and its rows are handed out before the next buffer is read. The first buffer of
an epoch is ordered exactly as the map-style path orders the whole file, so with a buffer that holds the whole
file both paths train on the same batches.

The position (epoch, the buffer's first record and its byte offset, the next row in the buffer) goes into every
checkpoint; a resumed run reads its buffer again from that offset (JSONL; other formats skip the records before
it) and continues exactly where the run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tunelab.data.batching import packed_rows, shuffled_examples
from tunelab.data.encode import EncodeStats, Encoded, encode_rows, pretokenized_rows
from tunelab.data.read import JsonlPlace, Record, iter_records, jsonl_from
from tunelab.data.records import to_examples
from tunelab.data.render import render_example
from tunelab.data.table import EncodeSpec

StreamUnit = list[Encoded]  # one batch row: an example (padded batches) or the examples packed into it


@dataclass
class StreamPosition:
    """Where the stream stands: the epoch, the current buffer (its first record, the JSONL place of that record),
    and the index of the next row of the buffer."""

    epoch: int = 0
    record: int = 0
    offset: int = 0
    line: int = 1
    index: int = 0


class StreamingUnits:
    """An endless stream of batch rows read from a file as it goes; resumable from a `StreamPosition`."""

    def __init__(self, path: str, how: EncodeSpec, shape: str, tokenizer: Any, buffer_size: int, seed: int,
                 capacity: int | None, virtual_tokens: int = 0) -> None:
        self.path, self.how, self.shape, self.tokenizer = Path(path), how, shape, tokenizer
        self.buffer_size, self.seed, self.capacity, self.virtual_tokens = buffer_size, seed, capacity, virtual_tokens
        self.position = StreamPosition()
        # (epoch, first record) -> its rows, the position after it, what encoding did to it
        self._buffer: tuple[tuple[int, int], list[StreamUnit], StreamPosition | None, EncodeStats] | None = None
        self._file_bytes = self.path.stat().st_size
        self._reader: tuple[int, Iterator[tuple[Record, JsonlPlace]]] | None = None  # (its next record, reader)

    def take(self, n: int) -> list[StreamUnit]:
        """The next n rows, reading the next buffer (or the file's start, in the next epoch) as one runs out."""
        out: list[StreamUnit] = []
        while len(out) < n:
            units, after = self._current()
            pos = self.position
            chunk = units[pos.index : pos.index + n - len(out)]
            out.extend(chunk)
            pos.index += len(chunk)
            if pos.index >= len(units):
                self.position = after if after is not None else StreamPosition(pos.epoch + 1)
        return out

    def batch_as(self, capacity: int | None, virtual_tokens: int) -> None:
        """Pack rows to `capacity` tokens (None: one example per row), each example after `virtual_tokens` slots."""
        self.capacity, self.virtual_tokens = capacity, virtual_tokens
        self._buffer, self._reader = None, None

    def first_buffer(self) -> tuple[list[Encoded], EncodeStats]:
        """The examples of the file's first buffer (in its training order) and what encoding did to them."""
        self._current_at(StreamPosition())
        assert self._buffer is not None
        return [e for unit in self._buffer[1] for e in unit], self._buffer[3]

    def epochs_done(self) -> float:
        """Epochs read so far (the part of an epoch measured in bytes of the file)."""
        return self.position.epoch + self.position.offset / max(1, self._file_bytes)

    def _current(self) -> tuple[list[StreamUnit], StreamPosition | None]:
        return self._current_at(self.position)

    def _current_at(self, pos: StreamPosition) -> tuple[list[StreamUnit], StreamPosition | None]:
        if self._buffer is None or self._buffer[0] != (pos.epoch, pos.record):
            self._buffer = ((pos.epoch, pos.record), *self._read_buffer(pos))
        return self._buffer[1], self._buffer[2]

    def _read_buffer(self, pos: StreamPosition) -> tuple[list[StreamUnit], StreamPosition | None, EncodeStats]:
        """The rows of the buffer that starts at `pos`, and the position of the next buffer (None: the epoch ends)."""
        records: list[Record] = []
        after = JsonlPlace(pos.offset, pos.line, pos.record)
        reader = self._records_from(pos)
        for record, place in islice(reader, self.buffer_size + 1):
            if len(records) == self.buffer_size:  # one record more: the file goes on after this buffer
                self._reader = (after.row, _prepend((record, place), reader))
                break
            records.append(record)
            after = place
        following = StreamPosition(pos.epoch, after.row, after.offset, after.line) if self._reader else None
        examples = to_examples(records, self.shape, self.how.columns)
        if self.shape == "tokenized":
            rows = pretokenized_rows(examples, self.how.max_length, self.how.truncation)
        else:
            rendered = [render_example(ex, self.how.spec, self.tokenizer, []) for ex in examples]
            rows = encode_rows(rendered, self.tokenizer, self.how.max_length, self.how.truncation)
        encoded = [enc for enc, _ in rows if enc is not None]
        stats = EncodeStats()
        for _, row_stats in rows:
            stats.add(row_stats)
        # buffer 0 of an epoch is ordered as the map-style path orders a whole file; later buffers by their own seed
        seed = self.seed + 1_000_003 * pos.record
        if self.capacity is None:
            order = shuffled_examples(len(encoded), seed)(pos.epoch)
        else:
            lengths = [len(e.input_ids) + self.virtual_tokens for e in encoded]
            order = packed_rows(lengths, self.capacity, seed)(pos.epoch)
        return [[encoded[i] for i in unit] for unit in order], following, stats

    def _records_from(self, pos: StreamPosition) -> Iterator[tuple[Record, JsonlPlace]]:
        """The records from `pos` on: the open reader where the last buffer stopped, else the file entered there."""
        reader, self._reader = self._reader, None
        if reader is not None and reader[0] == pos.record:
            return reader[1]
        if self.path.suffix.lower() in (".jsonl", ".ndjson"):
            return jsonl_from(self.path, JsonlPlace(pos.offset, pos.line, pos.record))
        # other formats cannot be entered in the middle: read from the start and skip what came before
        records = islice(iter_records(self.path, self.how.column_names), pos.record, None)
        return ((r, JsonlPlace(0, 1, r.row + 1)) for r in records)


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
