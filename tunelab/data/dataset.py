"""From config to encoded train and eval sets: read, split, render, encode."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.encode import EncodeStats, Encoded, encode_examples, encode_pretokenized
from tunelab.data.read import read_records
from tunelab.data.records import Example, check_same_shape, to_examples
from tunelab.data.render import Rendered, RenderSpec, render_example

log = logging.getLogger(__name__)


@dataclass
class Split:
    examples: list[Example]
    rendered: list[Rendered]
    encoded: list[Encoded]
    stats: EncodeStats = field(default_factory=EncodeStats)


def load_examples(path: str, cfg: DataConfig) -> list[Example]:
    return to_examples(read_records(path, cfg.column_names), cfg.format, cfg.columns)


def sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded sample in file order, not the head: labeled files are often sorted by label."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split; the eval part has at least one example and the train part keeps one."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    eval_idx = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in eval_idx],
            [e for i, e in enumerate(examples) if i in eval_idx])


def prepare_split(examples: list[Example], spec: RenderSpec, tokenizer: Any, cfg: DataConfig,
                  pool: list[Example]) -> Split:
    stats = EncodeStats()
    if examples and examples[0].shape == "tokenized":
        return Split(examples, [], encode_pretokenized(examples, cfg.max_length, cfg.truncation, stats), stats)
    rendered = [render_example(ex, spec, tokenizer, pool) for ex in examples]
    encoded = encode_examples(rendered, tokenizer, cfg.max_length, cfg.truncation, stats)
    return Split(examples, rendered, encoded, stats)


def load_datasets(cfg: DataConfig, spec: RenderSpec, tokenizer: Any, seed: int) -> tuple[Split, Split | None]:
    """Read the train (and eval) data as configured and encode both the same way."""
    train = sample(load_examples(cfg.train, cfg), cfg.max_examples, seed)
    evals: list[Example] | None = None
    if cfg.eval is not None:
        evals = load_examples(cfg.eval, cfg)
        check_same_shape(train, cfg.train, evals, cfg.eval)
    elif cfg.eval_fraction is not None:
        train, evals = split_eval(train, cfg.eval_fraction, seed)
    evals = sample(evals, cfg.max_eval_examples, seed) if evals else evals
    train_split = prepare_split(train, spec, tokenizer, cfg, pool=train)
    log.info("train data: %s", train_split.stats.summary())
    if not train_split.encoded:
        from tunelab.errors import DataError

        raise DataError(f"every training example of '{cfg.train}' was dropped by data.max_length={cfg.max_length}.")
    eval_split = None
    if evals:
        eval_split = prepare_split(evals, spec, tokenizer, cfg, pool=train)
        log.info("eval data: %s", eval_split.stats.summary())
    return train_split, eval_split
