"""Audit a labeled dataset before training: read it exactly as training will, then find what tends to
ruin a fine-tune: empty or truncated targets, duplicates, near duplicates (MinHash), conflicting
labels, train/eval leakage, label imbalance."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.encode import IGNORE, EncodeStats, Encoded, encode_examples, encode_pretokenized
from tunelab.data.read import Record, read_records
from tunelab.data.records import SHAPES, Example, check_same_shape, to_examples
from tunelab.data.render import Rendered, RenderSpec, render_example, turn_end
from tunelab.errors import ConfigError, DataError
from tunelab.percentile import percentile

_WORD = re.compile(r"\w+")


@dataclass
class Finding:
    severity: str  # "blocking" (training would fail or learn nothing), "warning" or "info"
    message: str
    indices: list[int] = field(default_factory=list)  # 0-based rows of the training file
    groups: list[list[int]] = field(default_factory=list)  # rows that belong together (duplicates, conflicts)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "count": len(self.indices), "message": self.message,
                "indices": self.indices, "groups": self.groups, **self.details}


def input_text(ex: Example) -> str:
    """Everything of a record except its target."""
    if ex.shape == "chat":
        msgs = ex.fields["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
    if ex.shape == "tokenized":
        return " ".join(map(str, ex.fields["prompt_ids"]))
    target_field = SHAPES[ex.shape][2]
    return "\n".join(str(v) for k, v in ex.fields.items() if k != target_field)


def output_text(ex: Example) -> str:
    return " ".join(map(str, ex.target)) if ex.shape == "tokenized" else ex.target


def norm(text: str) -> str:
    """For exact comparisons: case and whitespace do not count, every other character does."""
    return " ".join(text.lower().split())


def _shingles(text: str, n: int = 3) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _minhash(texts: list[str], num_perm: int = 128) -> list[Any]:
    from datasketch import MinHash

    hashes = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=1)
        for s in _shingles(t):
            m.update(s.encode("utf-8"))
        hashes.append(m)
    return hashes


def near_pairs(texts: list[str], threshold: float, others: list[str] | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i, j, estimated Jaccard >= threshold) of word-3-gram MinHash similarity: within `texts`,
    or between `texts` (i) and `others` (j)."""
    from datasketch import MinHashLSH

    hashes = _minhash(texts)
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    targets = _minhash(others) if others is not None else hashes
    for j, h in enumerate(targets):
        lsh.insert(j, h)
    pairs = []
    for i, h in enumerate(hashes):
        for j in lsh.query(h):
            if others is None and j <= i:
                continue
            score = h.jaccard(targets[j])
            if score >= threshold:
                pairs.append((i, j, score))
    return sorted(pairs)


def _union(pairs: list[tuple[int, int]], rows: list[int]) -> list[list[int]]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for x in {x for p in pairs for x in p}:
        groups[find(x)].append(x)
    return sorted(sorted(rows[i] for i in g) for g in groups.values())


@dataclass
class AuditInput:
    records: list[Record]
    examples: list[Example]
    empty: list[tuple[Record, str]]
    rendered: list[Rendered]
    encoded: list[Encoded]
    stats: EncodeStats


def _prepare(path: str, cfg: DataConfig, spec: RenderSpec, tokenizer: Any, pool: list[Example] | None) -> AuditInput:
    records = read_records(path, cfg.column_names)
    empty: list[tuple[Record, str]] = []
    examples = to_examples(records, cfg.format, cfg.columns, empty_targets=empty)
    if pool is not None:  # eval data: the training examples are the pool
        check_same_shape(pool, cfg.train, examples, path)
    stats = EncodeStats()
    if examples and examples[0].shape == "tokenized":
        return AuditInput(records, examples, empty, [], encode_pretokenized(examples, cfg.max_length, "left", stats), stats)
    rendered = [render_example(ex, spec, tokenizer, pool if pool is not None else examples) for ex in examples]
    truncation = cfg.truncation if cfg.truncation in ("left", "right") else "left"  # measure, never stop
    encoded = encode_examples(rendered, tokenizer, cfg.max_length, truncation, stats, lenient=True)
    return AuditInput(records, examples, empty, rendered, encoded, stats)


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {"mean": statistics.fmean(v), "p50": v[len(v) // 2], "p90": percentile(v, 0.9), "max": v[-1]}


def _duplicates(train: AuditInput, threshold: float) -> dict[str, Finding]:
    rows = [ex.row for ex in train.examples]
    inputs = [input_text(ex) for ex in train.examples]
    outputs = [output_text(ex) for ex in train.examples]
    by_pair: dict[tuple[str, str], list[int]] = defaultdict(list)
    by_input: dict[str, list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(zip(inputs, outputs)):
        by_pair[(norm(a), norm(b))].append(i)
        by_input[norm(a)].append(i)
    exact_groups = [sorted(rows[i] for i in g) for g in by_pair.values() if len(g) > 1]
    whole = [a + "\n" + b for a, b in zip(inputs, outputs)]
    near = [(i, j) for i, j, _ in near_pairs(whole, threshold)
            if (norm(inputs[i]), norm(outputs[i])) != (norm(inputs[j]), norm(outputs[j]))]
    near_groups = _union(near, rows)
    conflict_pairs = [(g[0], j) for g in by_input.values() if len(g) > 1 for j in g[1:]
                      if norm(outputs[g[0]]) != norm(outputs[j])]
    conflict_pairs += [(i, j) for i, j, _ in near_pairs(inputs, threshold)
                       if norm(outputs[i]) != norm(outputs[j]) and norm(inputs[i]) != norm(inputs[j])]
    conflict_groups = _union(conflict_pairs, rows)
    return {
        "exact_duplicates": Finding("warning", f"{len(exact_groups)} groups of identical examples "
                                    "(the same input and output): they weigh more than the others in training",
                                    sorted(r for g in exact_groups for r in g), exact_groups),
        "near_duplicates": Finding("warning", f"{len(near_groups)} groups of near-identical examples (word 3-gram "
                                   f"MinHash Jaccard >= {threshold})", sorted(r for g in near_groups for r in g),
                                   near_groups, {"threshold": threshold}),
        "conflicts": Finding("warning", f"{len(conflict_groups)} groups of examples with the same or near-same input "
                             "but different outputs: the model is taught two answers", sorted(r for g in conflict_groups
                                                                                                for r in g), conflict_groups),
    }


def blocking_findings(stats: EncodeStats, num_examples: int, max_length: int,
                      empty: list[tuple[Record, str]] | None = None) -> dict[str, Finding]:
    """The findings that can block training, from what encoding counted: empty targets, truncation (blocking
    when every target is cut) and targets with no token of their own.

    The one place that decides "blocking": `tunelab data check` reports these, and `tunelab train`
    (through `check_trainable`) refuses the same data with the same words. Cheap: counts only.
    """
    empty = empty or []
    cut_prompt, cut_target = stats.prompt_cut_rows, stats.target_cut_rows
    findings = {
        "empty_targets": Finding(
            "blocking", "examples with an empty target: training refuses them (remove or fill them; --fix drops them)",
            sorted(rec.row for rec, _ in empty), details={"reasons": [msg for _, msg in empty][:20]}),
        "truncated": Finding(
            "warning", f"examples longer than data.max_length={max_length}: {len(cut_prompt)} lose the start of "
                       f"their prompt, {len(cut_target)} lose the end of their target (and their EOS)",
            sorted(set(cut_prompt) | set(cut_target)),
            details={"prompt_cut": cut_prompt, "target_cut": cut_target,
                     "share_truncated": len(set(cut_prompt) | set(cut_target)) / max(1, num_examples),
                     "share_target_cut": len(cut_target) / max(1, num_examples)}),
        "no_trainable_tokens": Finding(
            "blocking", "examples whose target has no token of its own after tokenization", stats.untrainable_rows),
    }
    if num_examples and len(cut_target) == num_examples:
        findings["truncated"].severity = "blocking"
        findings["truncated"].message += (": every target is cut, so no example teaches the model to finish. "
                                          "Raise data.max_length")
    return findings


def blocking_keys(findings: dict[str, Finding]) -> list[str]:
    """The names of the findings that block training (blocking severity, and at least one row)."""
    return sorted(k for k, f in findings.items() if f.severity == "blocking" and f.indices)


def check_trainable(stats: EncodeStats, num_examples: int, max_length: int, path: str) -> None:
    """Refuse (DataError) training data that `tunelab data check` calls blocking, in the audit's words."""
    findings = blocking_findings(stats, num_examples, max_length)
    keys = blocking_keys(findings)
    if keys:
        raise DataError(f"'{path}': `tunelab data check` calls this data blocking, so training stops here. "
                        + " ".join(f"[blocking] {k}: {len(findings[k].indices)} rows. {findings[k].message}."
                                   for k in keys))


def audit(train_path: str, cfg: DataConfig, spec: RenderSpec, tokenizer: Any, eval_path: str | None = None,
          threshold: float = 0.8, preview: int = 3) -> dict[str, Any]:
    """Every finding about the training (and eval) data, as a JSON-ready dict."""
    train = _prepare(train_path, cfg, spec, tokenizer, None)
    st = train.stats
    findings: dict[str, Finding] = blocking_findings(st, len(train.examples), cfg.max_length, train.empty)
    cut = set(st.target_cut_rows)
    # the last trained tokens, not the last tokens: EOS, or the chat template's own end of turn
    end = turn_end(spec, tokenizer, bool(train.examples) and train.examples[0].shape == "chat")
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    no_eos = [e.row for e in train.encoded if e.row not in cut and
              [t for t in e.labels if t != IGNORE][-len(end_ids):] != end_ids] if end_ids else []
    findings["missing_eos"] = Finding("warning", f"targets that do not end with {end!r} (EOS, or the chat template's "
                                      "end of turn): the model will not learn to stop", no_eos)
    noted = [r for r in train.rendered if r.notes]
    if noted:  # a template that is not prefix-stable, or that opens a think block: named, with what tunelab does
        notes = list(dict.fromkeys(n for r in noted for n in r.notes))
        findings["chat_template"] = Finding("warning", " ".join(notes), sorted({r.row for r in noted}))
    findings.update(_duplicates(train, threshold))

    result: dict[str, Any] = {"train": train_path, "eval": eval_path, "num_records": len(train.records),
                              "num_examples": len(train.encoded), "shape": train.examples[0].shape if train.examples else None}
    prompt_lengths = [next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels)) for e in train.encoded]
    target_lengths = [sum(t != IGNORE for t in e.labels) for e in train.encoded]
    result["lengths"] = {"prompt_tokens": _length_stats(prompt_lengths), "target_tokens": _length_stats(target_lengths),
                         "prompt_values": prompt_lengths, "target_values": target_lengths}

    outputs = [output_text(ex) for ex in train.examples]
    evals = None
    if eval_path:
        evals = _prepare(eval_path, cfg, spec, tokenizer, train.examples)
        train_inputs = {norm(input_text(ex)): ex.row for ex in train.examples}
        exact = [(train_inputs[norm(input_text(ex))], ex.row) for ex in evals.examples
                 if norm(input_text(ex)) in train_inputs]
        near = near_pairs([input_text(ex) for ex in train.examples], threshold,
                          [input_text(ex) for ex in evals.examples])
        pairs = sorted({*exact, *((train.examples[i].row, evals.examples[j].row) for i, j, _ in near)})
        findings["leakage"] = Finding(
            "warning", f"{len({e for _, e in pairs})} eval examples whose input also appears (exactly or nearly, "
                       f"Jaccard >= {threshold}) in the training file: eval scores on them are not held-out scores",
            sorted({t for t, _ in pairs}), details={"pairs": [{"train_row": t, "eval_row": e} for t, e in pairs]})
    else:
        findings["leakage"] = Finding("info", "no eval file given: leakage not checked")
    distinct = Counter(norm(o) for o in outputs)
    if train.examples and (train.examples[0].shape == "text_label" or len(distinct) <= max(2, len(outputs) // 10)):
        counts = Counter(o.strip() for o in outputs)
        eval_only = sorted({output_text(ex).strip() for ex in evals.examples} - set(counts)) if evals else []
        ratio = max(counts.values()) / min(counts.values())
        findings["label_balance"] = Finding(
            "warning" if ratio > 10 or eval_only else "info",
            f"{len(counts)} labels; the most frequent is {ratio:.1f}x the rarest"
            + (f"; {len(eval_only)} labels appear only in eval" if eval_only else ""),
            details={"counts": dict(counts.most_common()), "eval_only_labels": eval_only})
    result.update({k: f.as_dict() for k, f in findings.items()})
    result["blocking"] = blocking_keys(findings)
    result["preview"] = [preview_tokens(e, tokenizer) for e in train.encoded[:preview]]
    return result


def preview_tokens(enc: Encoded, tokenizer: Any) -> dict[str, Any]:
    """The example's tokens as (text, trained) pieces, and the decoded text of each run of trained tokens (what the
    model learns to write: for a chat template, each assistant turn and the template's end of turn)."""
    pieces = [(tokenizer.decode([t]), label != IGNORE) for t, label in zip(enc.input_ids, enc.labels)]
    runs: list[list[int]] = []
    for i, (t, label) in enumerate(zip(enc.input_ids, enc.labels)):
        if label == IGNORE:
            continue
        if i and enc.labels[i - 1] != IGNORE and runs:
            runs[-1].append(t)
        else:
            runs.append([t])
    return {"row": enc.row, "source": enc.source, "tokens": pieces, "trained": [tokenizer.decode(r) for r in runs]}


def terminal_preview(item: dict[str, Any]) -> str:
    """Trained tokens in green, the rest dim (ANSI colours); then each trained run quoted, so that its whitespace
    (a newline after an end-of-turn token, say) shows."""
    marked = "".join(f"\x1b[32m{t}\x1b[0m" if trained else f"\x1b[2m{t}\x1b[0m" for t, trained in item["tokens"])
    return marked + "\ntrained: " + ", ".join(repr(run) for run in item["trained"])


def rows_to_drop(result: dict[str, Any]) -> set[int]:
    """What `--fix` removes: empty targets, all but the first of each duplicate group, conflicts, leaks."""
    drop = set(result["empty_targets"]["indices"])
    for key in ("exact_duplicates", "near_duplicates"):
        for group in result[key]["groups"]:
            drop.update(group[1:])
    drop.update(result["conflicts"]["indices"])
    drop.update(result["leakage"]["indices"])
    return drop


def source_configs(data: DataConfig) -> list[tuple[str, DataConfig]]:
    """Each file of data.train (one file, or each of a mixture's) with the reader settings it is read with, to audit
    one at a time."""
    return [(s.path, data.model_copy(update={"train": s.path, "format": s.format, "columns": s.columns,
                                             "column_names": s.column_names})) for s in data.sources()]


def check_fix_target(fix: str, sources: list[str]) -> None:
    """Refuse a `--fix` copy that cannot be written as asked, before anything is read: one file only, and never the
    original."""
    if len(sources) > 1:
        raise ConfigError("--fix writes a cleaned copy of one data file, and data.train is a mixture: check each file "
                          "on its own (tunelab data check FILE --model M --fix NEW_FILE).")
    if Path(fix).resolve() == Path(sources[0]).resolve():
        raise ConfigError("--fix must name a new file: tunelab never rewrites the original data.")


def write_fixed_copy(result: dict[str, Any], path: str, column_names: Any, out_file: str | Path) -> tuple[int, int]:
    """Write the records of `path` that `rows_to_drop(result)` keeps to `out_file` as JSON lines, the fields as
    read; returns (records written, rows dropped)."""
    drop = rows_to_drop(result)
    kept = [r.fields for r in read_records(path, column_names) if r.row not in drop]
    Path(out_file).write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in kept))
    return len(kept), len(drop)


def terminal_summary(result: dict[str, Any], path: str) -> str:
    """An audit as `tunelab data check` prints it: the counts, each finding with rows (blocking first), and the
    previews of the first examples with their trained tokens in colour."""
    order = {"blocking": 0, "warning": 1, "info": 2}
    keys = [k for k, v in result.items() if isinstance(v, dict) and "severity" in v]
    lines = [f"{result['num_examples']} examples of {result['num_records']} records in {path}"]
    for key in sorted(keys, key=lambda k: order[result[k]["severity"]]):
        f = result[key]
        if f["count"] or key == "label_balance":
            lines.append(f"[{f['severity']}] {key}: {f['count']} rows. {f['message']}")
    lines += [f"--- row {item['row']} (trained tokens in green)\n{terminal_preview(item)}"
              for item in result["preview"]]
    return "\n".join(lines)
