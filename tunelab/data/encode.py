"""Tokenize rendered examples into input ids and labels (-100 everywhere except target tokens).

The whole text is tokenized at once and each token is labeled by the characters it covers, so the
ids are exactly what the tokenizer gives for the full text. A token that covers both prompt and
target characters counts as target (`boundary_tokens` counts them: a template whose prompt ends in
a space usually causes them). Sequences longer than `max_length` are handled by a policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tunelab.data.render import Rendered
from tunelab.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained; the loss shifts them by one
    source: str
    row: int

    @cached_property
    def num_label_tokens(self) -> int:
        """Tokens the loss counts: labeled positions that have a position before them."""
        return len(self.labels) - 1 - self.labels[1:].count(IGNORE) if self.labels else 0


def example_lengths(examples: Sequence[Encoded]) -> list[int]:
    """Each example's number of tokens (an on-disk table answers from its length column, reading no row)."""
    lengths = getattr(examples, "lengths", None)
    return list(lengths) if lengths is not None else [len(e.input_ids) for e in examples]


@dataclass
class EncodeStats:
    """What encoding did to a dataset: the counts a user must see."""

    num_examples: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0
    prompts_truncated: int = 0
    targets_truncated: int = 0
    dropped: int = 0
    boundary_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    # 0-based file rows, for audits
    prompt_cut_rows: list[int] = field(default_factory=list)
    target_cut_rows: list[int] = field(default_factory=list)
    untrainable_rows: list[int] = field(default_factory=list)  # no token of their own (lenient encoding)

    def add(self, other: "EncodeStats") -> None:
        """Count `other`'s examples in too (encoding in batches: one total)."""
        for name, value in vars(other).items():
            if isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def summary(self) -> str:
        return (f"{self.num_examples} examples, {self.num_tokens} tokens ({self.num_label_tokens} trained); "
                f"truncated: {self.prompts_truncated} prompts, {self.targets_truncated} targets; "
                f"dropped: {self.dropped}")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (Llama does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _adds_only_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own special-token handling adds exactly one BOS in front, and nothing else."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer("a", add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id, *plain]


def tokenize_texts(tokenizer: Any, texts: list[str], offsets: bool = False) -> tuple[list[list[int]], list[Any]]:
    """Each text's ids as the tokenizer gives them for the whole text with its own special-token handling, and with
    `offsets` each token's character range in the text ((-1, -1) for a BOS the tokenizer adds).

    A tokenizer that puts BOS in front (Llama, Mistral) gets the text through `add_special_tokens=True`, so a
    SentencePiece-style tokenizer still opens the first word with its space marker ("<s> How", not "<s> H ow"
    as tokenizing "<s>How" gives); a text that already starts with BOS (a chat template wrote it) is tokenized
    as it is. A tokenizer whose special tokens are more than one BOS gets the BOS text prepended instead."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None
    if bos is None:
        ids, spans = _encode(tokenizer, texts, add_special_tokens=False)
        return ids, spans if offsets else [None] * len(texts)
    own = _adds_only_bos(tokenizer)
    plain = [i for i, t in enumerate(texts) if own and not t.startswith(bos)]  # the tokenizer adds BOS itself
    plain_set = set(plain)
    given = [i for i in range(len(texts)) if i not in plain_set]  # BOS is written (or prepended) as text
    ids_out: list[list[int]] = [[] for _ in texts]
    offsets_out: list[Any] = [None] * len(texts)
    ids, spans = _encode(tokenizer, [texts[i] for i in plain], add_special_tokens=True)
    for i, one_ids, one_spans in zip(plain, ids, spans):
        ids_out[i] = one_ids
        offsets_out[i] = [(-1, -1), *one_spans[1:]] if offsets else None
    full = [texts[i] if texts[i].startswith(bos) else bos + texts[i] for i in given]
    ids, spans = _encode(tokenizer, full, add_special_tokens=False)
    for i, text, one_ids, one_spans in zip(given, full, ids, spans):
        shift = len(text) - len(texts[i])
        ids_out[i] = one_ids
        offsets_out[i] = [(a - shift, b - shift) for a, b in one_spans] if offsets else None
    return ids_out, offsets_out


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> tuple[list[list[int]], list[Any]]:
    """(ids, character offsets) of each text, in one batched call. A fast tokenizer's own Rust tokenizer is called
    directly where it has no truncation or padding of its own (the same ids and offsets as through transformers'
    wrapper, without its per-text conversion)."""
    if not texts:
        return [], []
    backend = getattr(tokenizer, "_tokenizer", None)
    direct = (isinstance(backend, Tokenizer) and backend.truncation is None and backend.padding is None
              and not getattr(tokenizer, "split_special_tokens", False))  # else transformers resets those per call
    if direct:
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    batch = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return batch["input_ids"], batch["offset_mapping"]


def _label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[bool], int]:
    """Whether each token (its character range) overlaps a trained span, and how many tokens straddle a span's
    start (a token with an empty range, such as an added BOS, is trained where its position lies in a span)."""
    if not offsets:
        return [], 0
    o = np.asarray(offsets, dtype=np.int64)  # (tokens, 2)
    start, end = o[:, :1], o[:, 1:]
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    s, e = sp[None, :, 0], sp[None, :, 1]  # (1, spans)
    empty = (start == end)[:, 0]
    hit = np.where(empty, ((s <= start) & (start < e)).any(1), ((start < e) & (end > s)).any(1))
    boundary = int((~empty & ((start < s) & (s < end)).any(1)).sum())
    return hit.tolist(), boundary


def _truncate(ids: list[int], trained: list[bool], max_length: int, keep_first: int) -> tuple[list[int], list[bool], bool, bool]:
    """Cut the prompt from the left (after BOS); if the final target alone is too long, cut its end."""
    excess = len(ids) - max_length
    last_target_start = max(i for i, t in enumerate(trained) if t)
    while last_target_start > 0 and trained[last_target_start - 1]:
        last_target_start -= 1
    cut_prompt = min(excess, max(0, last_target_start - keep_first))
    ids = ids[:keep_first] + ids[keep_first + cut_prompt :]
    trained = trained[:keep_first] + trained[keep_first + cut_prompt :]
    cut_target = len(ids) > max_length
    return ids[:max_length], trained[:max_length], cut_prompt > 0, cut_target


def fit_length(ids: list[int], trained: list[bool], source: str, row: int, max_length: int, truncation: str,
               bos_id: int | None, stats: EncodeStats) -> Encoded | None:
    """Apply the length policy to one tokenized example; None when the policy drops it."""
    if len(ids) > max_length:
        if truncation == "error":
            raise DataError(f"{source}: the example is {len(ids)} tokens, longer than data.max_length={max_length}. "
                            "Raise data.max_length, or set data.truncation: left (cut the prompt) or drop.")
        if truncation == "drop":
            stats.dropped += 1
            stats.dropped_sources.append(source)
            return None
        if truncation == "right":
            cut_prompt, cut_target = False, True
            ids, trained = ids[:max_length], trained[:max_length]
        else:
            keep_first = int(bos_id is not None and ids[:1] == [bos_id])
            ids, trained, cut_prompt, cut_target = _truncate(ids, trained, max_length, keep_first)
        stats.prompts_truncated += cut_prompt
        stats.targets_truncated += cut_target
        if cut_prompt:
            stats.prompt_cut_rows.append(row)
        if cut_target:
            stats.target_cut_rows.append(row)
        if not any(trained[1:]):
            raise DataError(f"{source}: after truncation to data.max_length={max_length} ({truncation}) no target "
                            "token is left. Raise data.max_length, or set data.truncation: left (cut the prompt) "
                            "or drop.")
    enc = Encoded(list(ids), [t if hit else IGNORE for t, hit in zip(ids, trained)], source, row)
    if enc.num_label_tokens == 0:
        raise DataError(f"{source}: the example has no target token after its first position; nothing to train on.")
    stats.num_examples += 1
    stats.num_tokens += len(ids)
    stats.num_label_tokens += enc.num_label_tokens
    return enc


def encode_examples(rendered: list[Rendered], tokenizer: Any, max_length: int, truncation: str = "left",
                    stats: EncodeStats | None = None, lenient: bool = False) -> list[Encoded]:
    """Tokenize a list of rendered examples; `truncation` is 'left', 'right', 'drop' or 'error'.

    `lenient` (for audits): an example with no target token of its own is counted in
    `stats.untrainable_rows` and left out instead of stopping.
    """
    stats = stats if stats is not None else EncodeStats()
    out = []
    for enc, row_stats in encode_rows(rendered, tokenizer, max_length, truncation, lenient):
        stats.add(row_stats)
        if enc is not None:
            out.append(enc)
    return out


def encode_rows(rendered: list[Rendered], tokenizer: Any, max_length: int, truncation: str = "left",
                lenient: bool = False) -> list[tuple[Encoded | None, EncodeStats]]:
    """Each rendered example's encoding (None where the length policy drops it, or `lenient` leaves it out) and
    what encoding did to it, one row at a time: an on-disk table keeps them per row."""
    all_ids, all_offsets = tokenize_texts(tokenizer, [r.text for r in rendered], offsets=True)
    out: list[tuple[Encoded | None, EncodeStats]] = []
    for r, ids, offsets in zip(rendered, all_ids, all_offsets):
        stats = EncodeStats()
        trained, boundary = _label_tokens(offsets, r.spans)
        stats.boundary_tokens += boundary
        if not any(trained) and lenient:
            stats.untrainable_rows.append(r.row)
            out.append((None, stats))
            continue
        if not any(trained):
            raise DataError(f"{r.source}: the target has no token of its own after tokenization (the prompt's last "
                            "token swallows it). End the template's prompt with a separator such as ':' or a newline.")
        out.append((fit_length(ids, trained, r.source, r.row, max_length, truncation, tokenizer.bos_token_id, stats),
                    stats))
    eos_id = tokenizer.eos_token_id
    ends_with_eos = {r.source for r in rendered if tokenizer.eos_token and tokenizer.eos_token in r.target}
    expected = [e for e, _ in out if e is not None and e.source in ends_with_eos]  # targets whose text ends with EOS
    cut = sum(st.targets_truncated for _, st in out)
    if expected and all(eos_id not in e.labels for e in expected) and cut < sum(e is not None for e, _ in out):
        raise DataError(f"the tokenizer does not turn its EOS text {tokenizer.eos_token!r} into its EOS id {eos_id}; "
                        "targets would never teach the model to stop.")
    return out


def encode_pretokenized(examples: list[Any], max_length: int, truncation: str = "left",
                        stats: EncodeStats | None = None) -> list[Encoded]:
    """Examples of the `tokenized` shape: prompt_ids + completion_ids as given (no BOS or EOS is added)."""
    stats = stats if stats is not None else EncodeStats()
    out = []
    for enc, row_stats in pretokenized_rows(examples, max_length, truncation):
        stats.add(row_stats)
        if enc is not None:
            out.append(enc)
    return out


def pretokenized_rows(examples: list[Any], max_length: int, truncation: str = "left"
                      ) -> list[tuple[Encoded | None, EncodeStats]]:
    """`encode_pretokenized`, one row at a time (as `encode_rows`)."""
    out: list[tuple[Encoded | None, EncodeStats]] = []
    for ex in examples:
        stats = EncodeStats()
        prompt, completion = ex.fields["prompt_ids"], ex.fields["completion_ids"]
        out.append((fit_length(prompt + completion, [False] * len(prompt) + [True] * len(completion), ex.source,
                               ex.row, max_length, truncation, None, stats), stats))
    return out
