"""From config to encoded train and eval sets: read, encode (once per encoding, cached on disk), choose, split.

Every record of a file is encoded into an Arrow table (data/table.py) under a key made of everything that
changes its encoding (data/cache.py); a later run with the same key reads the table instead. Sampling
(`data.max_examples`), the held-out split (`data.eval_fraction`) and mixtures (`data.train` as a list of
weighted files) choose rows of those tables by seed, as they would choose records.
"""

from __future__ import annotations

import atexit
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config import DataConfig
from tunelab.data import cache
from tunelab.data.encode import IGNORE, EncodeStats
from tunelab.data.read import read_records
from tunelab.data.records import Example, check_same_shapes, to_examples
from tunelab.data.render import RenderSpec
from tunelab.data.streaming import StreamingUnits
from tunelab.data.table import (EncodedRows, EncodedTable, EncodeSpec, concatenate_encoded, encode_file,
                                 first_shape, kept_rows, open_encoded, rows_stats)
from tunelab.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Chosen examples, encoded: `encoded` holds those the length policy kept; `num_chosen` counts all chosen."""

    encoded: EncodedRows
    shape: str
    num_chosen: int
    stats: EncodeStats = field(default_factory=EncodeStats)
    shares: dict[str, int] = field(default_factory=dict)  # a mixture's chosen examples per source file
    chosen_rows: Any = None  # the chosen rows of `encoded.table` (an array)
    stream: StreamingUnits | None = None  # data.streaming: the rows, read as training goes (`encoded`: its first
    # buffer, which sizes the batches)

    def distinct_targets(self) -> int:
        """How many different targets the chosen examples have (a label task has few); counted in Arrow, reading
        only the target column (a stream: the distinct trained tokens of its first buffer)."""
        if self.chosen_rows is None:
            return len({tuple(t for t in e.labels if t != IGNORE) for e in self.encoded})
        import pyarrow.compute as pc

        targets = self.encoded.table.rows.data.column("target").take(self.chosen_rows)
        return pc.count_distinct(targets).as_py() if len(self.chosen_rows) else 0


def load_examples(path: str, reader: Any) -> list[Example]:
    """A file's examples in memory; `reader` has the reader settings (format, columns, column_names)."""
    return to_examples(read_records(path, reader.column_names), reader.format, reader.columns)


def sample(examples: list[Any], limit: int | None, seed: int) -> list[Any]:
    """A seeded sample in file order, not the head: labeled files are often sorted by label."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def split_eval(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random split; the eval part has at least one example and the train part keeps one."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    eval_idx = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in eval_idx],
            [e for i, e in enumerate(examples) if i in eval_idx])


@dataclass
class _Encoded:
    table: EncodedTable
    shape: str
    path: str


def _encode_spec(source: Any, cfg: DataConfig, spec: RenderSpec) -> EncodeSpec:
    return EncodeSpec(source.format, dict(source.columns), source.column_names, spec, cfg.max_length, cfg.truncation)


def _render_key(spec: RenderSpec) -> dict[str, Any]:
    return {"mode": spec.mode, "template": spec.template.model_dump() if spec.template else None,
            "num_shots": spec.num_shots, "seed": spec.seed if spec.num_shots else None,
            "last_turn_only": spec.last_turn_only, "chat_template": spec.chat_template, "append_eos": spec.append_eos,
            "enable_thinking": spec.enable_thinking}


def _encoded(path: str, how: EncodeSpec, tokenizer: Any, pool: list[Example], pool_key: Any,
             cfg: DataConfig) -> _Encoded:
    """The encoded table of a file: from the cache when an entry has this encoding's key, else encoded now."""
    _check_exists(path)
    if not cfg.cache:
        tmp = Path(tempfile.mkdtemp(prefix="tunelab-encoded-"))
        atexit.register(shutil.rmtree, tmp, True)
        shape = encode_file(path, how, tokenizer, pool, tmp, cfg.num_proc)
        return _Encoded(open_encoded(tmp, path), shape, path)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_cache_dir()
    parts = {"file": cache.file_fingerprint(path, cache_dir), "tokenizer": cache.tokenizer_fingerprint(tokenizer),
             "format": how.format, "columns": how.columns, "column_names": how.column_names,
             "render": _render_key(how.spec), "max_length": how.max_length, "truncation": how.truncation,
             "pool": pool_key}
    key = cache.encoding_key(parts)
    entry = cache.lookup(cache_dir, key)
    if entry is not None:
        log.info("%s: reusing its encoded rows in %s (cache hit)", path, entry)
    else:
        def write(folder: Path) -> dict[str, Any]:
            shape = encode_file(path, how, tokenizer, pool, folder, cfg.num_proc)
            return {"shape": shape, "file": str(Path(path).resolve()), "key": parts}

        entry = cache.store(cache_dir, key, write)
        log.info("%s: encoded into %s (cached for the next run with the same encoding)", path, entry)
    return _Encoded(open_encoded(entry, path), cache.read_meta(entry)["shape"], path)


def _check_exists(path: str) -> None:
    """Before hashing it: the reader's own error for a missing file."""
    if not Path(path).is_file():
        raise DataError(f"data file '{path}' does not exist. Check data.train / data.eval in the config.")


def _choose(n: int, cfg: DataConfig, seed: int, split: bool) -> tuple[Any, list[int] | None]:
    """(train rows, held-out rows) of a file of `n` records: the seeded sample, then the seeded split."""
    if cfg.max_examples is None and not (split and cfg.eval is None and cfg.eval_fraction is not None):
        return np.arange(n), None  # every row: an array, not a list of millions of ints
    chosen = sample(list(range(n)), cfg.max_examples, seed)
    if split and cfg.eval is None and cfg.eval_fraction is not None:
        return split_eval(chosen, cfg.eval_fraction, seed)
    return chosen, None


def _mixture(tables: list[_Encoded], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(source, row) pairs of one epoch of the mixture: as many examples as the sources hold together, each
    source's share in proportion to its weight (its rows in a seeded order, repeated when it is upsampled)."""
    total, weight_sum = sum(len(t.table) for t in tables), sum(weights)
    drawn: list[tuple[int, int]] = []
    for k, (t, w) in enumerate(zip(tables, weights)):
        order = list(range(len(t.table)))
        random.Random(f"{seed}:mixture:{k}").shuffle(order)
        count = max(1, round(total * w / weight_sum))
        drawn += [(k, order[i % len(order)]) for i in range(count)]
    return drawn


def _split(table: EncodedTable, chosen: Any, shape: str) -> Split:
    rows = np.asarray(chosen, dtype=np.int64)
    return Split(EncodedRows(table, kept_rows(table, rows)), shape, len(rows), rows_stats(table, rows),
                 chosen_rows=rows)


def load_datasets(cfg: DataConfig, spec: RenderSpec, tokenizer: Any, seed: int) -> tuple[Split, Split | None]:
    """Read the train (and eval) data as configured and encode both the same way."""
    sources = cfg.sources()
    if isinstance(cfg.train, list):
        if spec.num_shots:
            raise ConfigError("strategy.num_shots draws demonstrations from one training file, and data.train is a "
                              "mixture of files: set num_shots: 0, or train on one file.")
        if cfg.eval is None and cfg.eval_fraction is not None:
            raise ConfigError("data.eval_fraction splits one training file, and data.train is a mixture: name "
                              "held-out data with data.eval instead.")
    if cfg.streaming:
        return _streamed(cfg, spec, tokenizer, seed)
    pool, pool_key = [], None
    if spec.num_shots:  # the demonstrations come from the chosen training examples: they are part of the encoding
        examples = load_examples(sources[0].path, sources[0])
        train_rows, _ = _choose(len(examples), cfg, seed, split=True)
        pool = [examples[i] for i in train_rows]
        pool_key = {"seed": seed, "max_examples": cfg.max_examples,
                    "eval_fraction": cfg.eval_fraction if cfg.eval is None else None}
    tables = [_encoded(s.path, _encode_spec(s, cfg, spec), tokenizer, pool, pool_key, cfg) for s in sources]
    for t in tables[1:]:
        check_same_shapes(tables[0].shape, tables[0].path, t.shape, t.path)

    if len(tables) == 1:
        train_rows, eval_rows = _choose(len(tables[0].table), cfg, seed, split=True)
        table, shares = tables[0].table, {}
    else:
        offsets = np.cumsum([0] + [len(t.table) for t in tables])
        drawn = sample(_mixture(tables, [s.weight for s in sources], seed), cfg.max_examples, seed)
        train_rows, eval_rows = [int(offsets[k]) + r for k, r in drawn], None
        table = concatenate_encoded([t.table for t in tables])
        shares = {s.path: sum(1 for k, _ in drawn if k == i) for i, s in enumerate(sources)}
    train = _split(table, train_rows, tables[0].shape)
    train.shares = shares
    log.info("train data: %s", train.stats.summary())
    for path, n in shares.items():
        log.info("train data mixture: %s gives %d examples (%.1f%%)", path, n, 100 * n / max(1, train.num_chosen))
    if not len(train.encoded):
        raise DataError(f"every training example of '{cfg.train_path}' was dropped by "
                        f"data.max_length={cfg.max_length}.")

    evals = _eval_file(cfg, spec, tokenizer, seed, tables[0].shape, pool, pool_key)
    if evals is None and eval_rows:
        evals = _split(table, sample(eval_rows, cfg.max_eval_examples, seed), tables[0].shape)
    if evals is not None:
        log.info("eval data: %s", evals.stats.summary())
    return train, evals


def _eval_file(cfg: DataConfig, spec: RenderSpec, tokenizer: Any, seed: int, train_shape: str,
               pool: list[Example], pool_key: Any) -> Split | None:
    """data.eval, encoded (and cached) as the training data is."""
    if cfg.eval is None:
        return None
    table = _encoded(cfg.eval, _encode_spec(cfg, cfg, spec), tokenizer, pool, pool_key, cfg)
    check_same_shapes(train_shape, cfg.train_path, table.shape, cfg.eval)
    return _split(table.table, sample(list(range(len(table.table))), cfg.max_eval_examples, seed), table.shape)


def _streamed(cfg: DataConfig, spec: RenderSpec, tokenizer: Any, seed: int) -> tuple[Split, Split | None]:
    """data.streaming: the training file as a stream of rows; its first buffer is encoded now, to check it and to
    size the batches."""
    how = _encode_spec(cfg, cfg, spec)
    shape = first_shape(cfg.train_path, how)  # the reader names a missing file
    stream = StreamingUnits(cfg.train_path, how, shape, tokenizer, cfg.shuffle_buffer, seed, capacity=None)
    first, stats = stream.first_buffer()
    train = Split(first, shape, stats.num_examples + stats.dropped, stats, stream=stream)
    log.info("train data: streamed from %s, %d records at a time; its first buffer: %s", cfg.train_path,
             cfg.shuffle_buffer, stats.summary())
    if not first:
        raise DataError(f"every training example of the first {cfg.shuffle_buffer} records of '{cfg.train_path}' was "
                        f"dropped by data.max_length={cfg.max_length}.")
    evals = _eval_file(cfg, spec, tokenizer, seed, shape, [], None)
    if evals is not None:
        log.info("eval data: %s", evals.stats.summary())
    return train, evals
