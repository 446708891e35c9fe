"""Encoded data as an Arrow table (the `datasets` library): written once per encoding, memory-mapped after.

A file is read record by record into a table of pickled records, then rendered and tokenized by
`Dataset.map(batched=True, num_proc=...)` into one row per record: its input ids, which of them train,
its length, and what the length policy did to it (a row it drops stays, marked, so that a seeded
sample or split of the file picks the same records as it would without the cache). Training, packing and
evaluation read rows by index; packing plans read only the `length` column.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger(__name__)

_RAW = "raw.arrow"
_ENCODED = "encoded.arrow"
INDEX_COLUMNS = {"length": np.int32, "num_label_tokens": np.int32, "dropped": np.bool_, "prompt_cut": np.bool_,
                 "target_cut": np.bool_, "boundary": np.int32, "row": np.int64}  # each row's figures, and their types


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
    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter

    shape = first_shape(path, how)
    raw = out_dir / _RAW
    with ArrowWriter(path=str(raw), features=Features({"record": Value("binary"), "source": Value("string"),
                                                       "row": Value("int64")})) as writer:
        for rec in iter_records(path, how.column_names):
            writer.write({"record": pickle.dumps(rec.fields), "source": rec.source, "row": rec.row})
        writer.finalize()
    records = Dataset.from_file(str(raw))
    # 5,000 rows a batch: each becomes one record batch of the file, whose header a reader touches when it opens it
    records.map(_encode_batch, batched=True, batch_size=5000, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=records.column_names, features=_features(), cache_file_name=str(out_dir / _ENCODED),
                new_fingerprint=hashlib.sha256(str(out_dir).encode()).hexdigest()[:32],
                desc=f"tunelab: encoding {Path(path).name}",
                fn_kwargs={"shape": shape, "how": how, "tokenizer": tokenizer, "pool": pool})
    del records
    raw.unlink()
    _write_index(out_dir, _count_rows(out_dir))
    return shape


def _count_rows(out_dir: Path) -> int:
    import pyarrow as pa

    total = 0
    for path in sorted(out_dir.glob("encoded*.arrow")):
        with pa.OSFile(str(path)) as src:
            total += sum(batch.num_rows for batch in pa.ipc.open_stream(src))
    return total


def _write_index(out_dir: Path, num_rows: int) -> None:
    """Each row's figures again, each column in one contiguous .npy file. The Arrow table interleaves them with the
    token ids a batch at a time, so reading a column there maps pages all through the file; these are written
    from record batches read (not mapped) one at a time, so that writing them does not grow the process either."""
    import pyarrow as pa

    files = {name: (out_dir / f"{name}.npy").open("wb") for name in INDEX_COLUMNS}
    try:
        for name, f in files.items():
            descr = np.lib.format.dtype_to_descr(np.dtype(INDEX_COLUMNS[name]))
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": (num_rows,)})
        for path in sorted(out_dir.glob("encoded*.arrow")):
            with pa.OSFile(str(path)) as src:
                for batch in pa.ipc.open_stream(src):
                    for name, f in files.items():
                        values = batch.column(name).to_numpy(zero_copy_only=False)
                        f.write(values.astype(INDEX_COLUMNS[name], copy=False).tobytes())
    finally:
        for f in files.values():
            f.close()


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
        trained = [t != IGNORE for t in enc.labels] if enc is not None else []
        values = {"input_ids": ids, "trained": trained, "length": len(ids),
                  "num_label_tokens": enc.num_label_tokens if enc is not None else 0, "source": ex.source,
                  "row": ex.row, "target": target, "dropped": enc is None, "prompt_cut": bool(st.prompts_truncated),
                  "target_cut": bool(st.targets_truncated), "boundary": st.boundary_tokens}
        for name, value in values.items():
            out[name].append(value)
    return out



@dataclass
class EncodedTable:
    """An encoded file: its rows (token ids, trained mask, source, target; memory-mapped Arrow) and each row's
    figures as contiguous arrays (memory-mapped .npy)."""

    rows: Any  # datasets.Dataset
    index: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)


def _open_rows(folder: Path) -> Any:
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(f)) for f in sorted(folder.glob("encoded*.arrow"))]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def open_encoded(folder: Path) -> EncodedTable:
    """The encoded file in `folder` (one Arrow file, or one per `num_proc` worker, in order)."""
    return EncodedTable(_open_rows(folder), {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                                             for name in INDEX_COLUMNS})


def concatenate_encoded(tables: list[EncodedTable]) -> EncodedTable:
    """Several encoded files as one table (a mixture), rows in order."""
    from datasets import concatenate_datasets

    return EncodedTable(concatenate_datasets([t.rows for t in tables]),
                        {name: np.concatenate([t.index[name] for t in tables]) for name in INDEX_COLUMNS})


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
        r = self.table.rows[int(self.indices[i])]
        labels = [t if m else IGNORE for t, m in zip(r["input_ids"], r["trained"])]
        return Encoded(r["input_ids"], labels, r["source"], r["row"])

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
    sources = table.rows.data.column("source")
    return EncodeStats(
        num_examples=len(kept), num_tokens=int(ix["length"][kept].sum()),
        num_label_tokens=int(ix["num_label_tokens"][kept].sum()),
        prompts_truncated=int(prompt_cut.sum()), targets_truncated=int(target_cut.sum()), dropped=int(dropped.sum()),
        boundary_tokens=int(ix["boundary"][indices].sum()),
        dropped_sources=[sources[int(i)].as_py() for i in indices[dropped]],
        prompt_cut_rows=ix["row"][kept[prompt_cut]].tolist(), target_cut_rows=ix["row"][kept[target_cut]].tolist())
