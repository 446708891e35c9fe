"""Encoded data as an Arrow table (the `datasets` library): written once per encoding, memory-mapped after.

A file is read record by record into a table of pickled records, then rendered and tokenized by
`Dataset.map(batched=True, num_proc=...)` into one row per record: its input ids, which of them train,
its length, source, target, and what the length policy did to it (a row it drops stays, marked, so that a
seeded sample or split of the file picks the same records as it would without the cache). Each row's figures
and all rows' tokens are then written again to contiguous .npy files: training, packing and evaluation read
rows by index from those (packing plans only the lengths); the Arrow rows are opened for targets only.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from tunelab.data.encode import IGNORE, EncodeStats, Encoded, encode_rows, pretokenized_rows
from tunelab.data.read import Record, iter_records
from tunelab.data.records import Example, to_examples
from tunelab.data.render import RenderSpec, render_example


_RAW = "raw.arrow"
_ENCODED = "encoded.arrow"
INDEX_COLUMNS = {"length": np.int32, "num_label_tokens": np.int32, "dropped": np.bool_, "prompt_cut": np.bool_,
                 "target_cut": np.bool_, "boundary": np.int32, "row": np.int64,
                 "line": np.int64}  # each row's figures, and their types
TOKEN_COLUMNS = {"input_ids": ("tokens", np.int32), "trained": ("trained", np.bool_)}  # all rows' tokens, one run


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "trained": List(Value("bool")), "length": Value("int32"),
                     "num_label_tokens": Value("int32"), "source": Value("string"), "row": Value("int64"),
                     "target": Value("string"), "dropped": Value("bool"), "prompt_cut": Value("bool"),
                     "target_cut": Value("bool"), "boundary": Value("int32")})


@dataclass(frozen=True)
class EncodeSpec:
    """How a file's records become rows: reader settings, rendering, tokenizer and length policy."""

    format: str
    columns: dict[str, str]
    column_names: list[str] | None
    spec: RenderSpec
    max_length: int
    truncation: str


def first_shape(path: str, how: Any) -> str:
    """The record shape of a file, from its first record (as reading the whole file would decide it); `how` has
    the reader settings (format, columns, column_names)."""
    first = next(iter_records(path, how.column_names))
    return to_examples([first], how.format, how.columns)[0].shape


def encode_file(path: str, how: EncodeSpec, tokenizer: Any, pool: list[Example], out_dir: Path,
                num_proc: int = 1) -> str:
    """Encode every record of `path` into `out_dir` (Arrow files); returns the record shape."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    shape = first_shape(path, how)
    raw = out_dir / _RAW
    with ArrowWriter(path=str(raw), features=Features({"record": Value("binary"), "source": Value("string"),
                                                       "row": Value("int64")})) as writer:
        for rec in iter_records(path, how.column_names):
            writer.write({"record": pickle.dumps(rec.fields), "source": rec.source, "row": rec.row})
        writer.finalize()
    _in_child(_map_file, raw, out_dir, path, shape, how, tokenizer, pool, num_proc)
    raw.unlink()
    _write_index(out_dir)
    return shape


def _map_file(raw: Path, out_dir: Path, path: str, shape: str, how: EncodeSpec, tokenizer: Any,
              pool: list[Example], num_proc: int) -> None:
    from datasets import Dataset

    records = Dataset.from_file(str(raw))
    # 5,000 rows a batch: each becomes one record batch of the file
    records.map(_encode_batch, batched=True, batch_size=5000, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=records.column_names, features=_features(), cache_file_name=str(out_dir / _ENCODED),
                new_fingerprint=hashlib.sha256(str(out_dir).encode()).hexdigest()[:32],
                desc=f"tunelab: encoding {Path(path).name}",
                fn_kwargs={"shape": shape, "how": how, "tokenizer": tokenizer, "pool": pool})


def _in_child(fn: Any, *args: Any) -> None:
    """Run `fn(*args)` in a forked child process and raise what it raised. `map` opens the Arrow files it wrote
    (pyarrow then touches pages all through them): in a child, the training process never holds those pages."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def run() -> None:
        _die_with_parent()
        try:
            fn(*args)
            writer.send(None)
        except BaseException as exc:  # sent back whole: the parent raises it (a DataError names the file and line)
            writer.send(exc)

    child = ctx.Process(target=run)
    child.start()
    writer.close()
    try:
        error = reader.recv()
    except EOFError:  # the child died without a word (killed): nothing was published
        error = None
    child.join()
    if error is None and child.exitcode:
        error = RuntimeError(f"the encoding process ended with exit code {child.exitcode}")
    if error is not None:
        raise error


def _die_with_parent() -> None:
    """Linux: the child is killed when its parent dies (a killed run leaves no orphan writing into the cache)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _batches(out_dir: Path) -> Iterator[Any]:
    """The record batches of the encoded files, in order, each read (not memory-mapped) on its own."""
    import pyarrow as pa

    for path in sorted(out_dir.glob("encoded*.arrow")):
        with pa.OSFile(str(path)) as src:
            yield from pa.ipc.open_stream(src)


def _write_index(out_dir: Path) -> None:
    """Each row's figures, and all rows' tokens and trained mask end to end, each in one contiguous .npy file.
    Training reads these (memory-mapped) and never opens the Arrow table, whose columns interleave a batch at a
    time: reading one there maps pages all through the file. Written from record batches read one at a time, so
    that writing them does not grow the process either."""
    num_rows = num_tokens = 0
    for batch in _batches(out_dir):
        num_rows += batch.num_rows
        num_tokens += int(batch.column("length").to_numpy().sum())
    shapes = {**{name: num_rows for name in INDEX_COLUMNS}, **{name: num_tokens for name, _ in TOKEN_COLUMNS.values()}}
    dtypes = {**INDEX_COLUMNS, **dict(TOKEN_COLUMNS.values())}
    files = {name: (out_dir / f"{name}.npy").open("wb") for name in shapes}
    try:
        for name, f in files.items():
            descr = np.lib.format.dtype_to_descr(np.dtype(dtypes[name]))
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": (shapes[name],)})
        for batch in _batches(out_dir):
            columns = {name: batch.column(name) for name in INDEX_COLUMNS if name != "line"}
            columns["line"] = [_line_of(source) for source in batch.column("source").to_pylist()]
            columns.update({file: batch.column(name).flatten() for name, (file, _) in TOKEN_COLUMNS.items()})
            for name, values in columns.items():
                array = values if isinstance(values, list) else values.to_numpy(zero_copy_only=False)
                files[name].write(np.asarray(array, dtype=dtypes[name]).tobytes())
    finally:
        for f in files.values():
            f.close()


def _line_of(source: str) -> int:
    """A record's place from its source: 'path:LINE' gives LINE; 'path:row N' (Parquet, JSON arrays) gives -1-N."""
    place = source.rsplit(":", 1)[1]
    return int(place) if not place.startswith("row ") else -1 - int(place[4:])


def _source(prefix: str, line: int) -> str:
    return f"{prefix}:{line}" if line >= 0 else f"{prefix}:row {-1 - line}"


def _encode_batch(batch: dict[str, list[Any]], shape: str, how: EncodeSpec, tokenizer: Any,
                  pool: list[Example]) -> dict[str, list[Any]]:
    records = [Record(pickle.loads(f), s, r) for f, s, r in zip(batch["record"], batch["source"], batch["row"])]
    examples = to_examples(records, shape, how.columns)
    if shape == "tokenized":
        rows = pretokenized_rows(examples, how.max_length, how.truncation)
        targets = [""] * len(examples)
    else:
        rendered = [render_example(ex, how.spec, tokenizer, pool) for ex in examples]
        rows = encode_rows(rendered, tokenizer, how.max_length, how.truncation)
        targets = [ex.target for ex in examples]
    out: dict[str, list[Any]] = {name: [] for name in _features()}
    for ex, target, (enc, st) in zip(examples, targets, rows):
        ids = enc.input_ids if enc is not None else []
        trained = (np.asarray(enc.labels) != IGNORE).tolist() if enc is not None else []
        values = {"input_ids": ids, "trained": trained, "length": len(ids),
                  "num_label_tokens": enc.num_label_tokens if enc is not None else 0, "source": ex.source,
                  "row": ex.row, "target": target, "dropped": enc is None, "prompt_cut": bool(st.prompts_truncated),
                  "target_cut": bool(st.targets_truncated), "boundary": st.boundary_tokens}
        for name, value in values.items():
            out[name].append(value)
    return out


@dataclass
class EncodedTable:
    """Encoded files, rows in order: each row's figures and all tokens (memory-mapped .npy), and the Arrow rows
    (token ids, trained mask, source, target), opened only when a target or a dropped row's source is asked for."""

    folders: list[Path]
    paths: list[str]  # each file's path as the reader names it in sources
    index: dict[str, np.ndarray]
    tokens: np.ndarray  # every row's input ids, end to end
    trained: np.ndarray  # (bool) whether each of those trains
    file_starts: np.ndarray  # the first row of each file
    _rows: Any = None
    _starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index["length"])

    @property
    def rows(self) -> Any:
        """The Arrow rows (datasets), memory-mapped."""
        if self._rows is None:
            from datasets import Dataset, concatenate_datasets

            files = [f for folder in self.folders for f in sorted(folder.glob("encoded*.arrow"))]
            parts = [Dataset.from_file(str(f)) for f in files]
            self._rows = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        return self._rows

    @property
    def starts(self) -> np.ndarray:
        """Where each row's tokens begin in `tokens` (and where the last ends)."""
        if self._starts is None:
            self._starts = np.concatenate([[0], np.cumsum(self.index["length"], dtype=np.int64)])
        return self._starts

    def source(self, row: int) -> str:
        """Where row `row` came from ('path:line', as the reader named it), for the path the file has now."""
        file = int(np.searchsorted(self.file_starts, row, side="right")) - 1
        return _source(self.paths[file], int(self.index["line"][row]))


def open_encoded(folder: Path, path: str) -> EncodedTable:
    """The encoded file `path` in `folder`."""
    index = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in INDEX_COLUMNS}
    return EncodedTable([folder], [str(Path(path))], index, np.load(folder / "tokens.npy", mmap_mode="r"),
                        np.load(folder / "trained.npy", mmap_mode="r"), np.zeros(1, dtype=np.int64))


def concatenate_encoded(tables: list[EncodedTable]) -> EncodedTable:
    """Several encoded files as one table (a mixture), rows in order."""
    starts = np.cumsum([0] + [len(t) for t in tables[:-1]])
    return EncodedTable([f for t in tables for f in t.folders], [p for t in tables for p in t.paths],
                        {name: np.concatenate([t.index[name] for t in tables]) for name in INDEX_COLUMNS},
                        np.concatenate([t.tokens for t in tables]), np.concatenate([t.trained for t in tables]),
                        starts)


class EncodedRows(Sequence[Encoded]):
    """Chosen rows of an encoded table, read as `Encoded` examples on demand (the table stays on disk)."""

    def __init__(self, table: EncodedTable, indices: np.ndarray) -> None:
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths: list[int] = table.index["length"][self.indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...

    @overload
    def __getitem__(self, i: slice) -> list[Encoded]: ...

    def __getitem__(self, i: int | slice) -> Encoded | list[Encoded]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = int(self.indices[i])
        start, end = self.table.starts[row], self.table.starts[row + 1]
        ids = self.table.tokens[start:end]
        labels = np.where(self.table.trained[start:end], ids, IGNORE).tolist()
        return Encoded(ids.tolist(), labels, self.table.source(row), int(self.table.index["row"][row]))

    def __iter__(self) -> Iterator[Encoded]:
        return (self[k] for k in range(len(self)))


def kept_rows(table: EncodedTable, indices: np.ndarray) -> np.ndarray:
    """The rows among `indices` that the length policy kept, in the same order."""
    indices = np.asarray(indices, dtype=np.int64)
    return indices[~table.index["dropped"][indices]]


def rows_stats(table: EncodedTable, indices: np.ndarray) -> EncodeStats:
    """What encoding did to the chosen rows (as `encode_examples` counts it), from the per-row figures."""
    indices = np.asarray(indices, dtype=np.int64)
    ix = table.index
    dropped = ix["dropped"][indices]
    kept = indices[~dropped]
    prompt_cut, target_cut = ix["prompt_cut"][kept], ix["target_cut"][kept]
    return EncodeStats(
        num_examples=len(kept), num_tokens=int(ix["length"][kept].sum()),
        num_label_tokens=int(ix["num_label_tokens"][kept].sum()),
        prompts_truncated=int(prompt_cut.sum()), targets_truncated=int(target_cut.sum()), dropped=int(dropped.sum()),
        boundary_tokens=int(ix["boundary"][indices].sum()),
        dropped_sources=[table.source(int(i)) for i in indices[dropped]],
        prompt_cut_rows=ix["row"][kept[prompt_cut]].tolist(), target_cut_rows=ix["row"][kept[target_cut]].tolist())
