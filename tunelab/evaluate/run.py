"""`tunelab eval`: render the data as training did, predict (generate or rank label options), score."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig, EvalConfig, Template
from tunelab.data.dataset import load_examples, sample
from tunelab.data.records import Example, check_same_shape
from tunelab.data.render import THINK_CLOSE, RenderSpec, render_example
from tunelab.errors import DataError
from tunelab.evaluate.baselines import baselines
from tunelab.evaluate.generate import generate
from tunelab.evaluate.labels import closed_label_set
from tunelab.evaluate.loaders import EvalModel
from tunelab.evaluate.metrics import compute, normalize
from tunelab.evaluate.score import rank_options

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Eval examples with the rendering that training used, and the training examples (demonstrations, labels)."""

    examples: list[Example]
    data_cfg: DataConfig
    spec: RenderSpec
    pool: list[Example]
    path: str


def default_metrics(mode: str, references: list[str], labels: list[str] | None = None) -> list[str]:
    """Label metrics when ranking labels, or generating from a closed label set (exact match beside them); else
    text-overlap metrics (and numeric match for answers ending `#### N`)."""
    if mode == "score":
        return ["accuracy", "macro_f1"]
    if labels:
        return ["accuracy", "macro_f1", "exact_match"]
    names = ["exact_match", "token_f1", "rouge_l"]
    if any("####" in r for r in references):
        names.append("numeric_match")
    return names


def label_options(data: EvalData) -> list[str]:
    return sorted({ex.target for ex in data.examples} | {ex.target for ex in data.pool})


def predict(em: EvalModel, data: EvalData, settings: EvalConfig) -> tuple[str, list[dict[str, Any]]]:
    """(mode used, one row per example: input, reference, prediction, and for generation whether it stopped)."""
    shape = data.examples[0].shape
    if shape in ("text", "tokenized"):
        raise DataError(f"'{data.path}' holds {shape} records, which have no prompt/target to predict; "
                        "eval loss is reported by training (train.eval_every).")
    mode = settings.mode if settings.mode != "auto" else ("score" if shape == "text_label" else "generate")
    rendered = [render_example(ex, data.spec, em.tokenizer, data.pool) for ex in data.examples]
    rows = [{"index": ex.row, "source": ex.source, "input": r.prompt} for ex, r in zip(data.examples, rendered)]
    if mode == "score":
        options = label_options(data)
        ranked = rank_options(em.model, em.tokenizer, data.examples, options, data.spec, data.pool,
                              data.data_cfg.max_length, batch_size=4 * settings.batch_size)
        for row, ex, (best, _) in zip(rows, data.examples, ranked):
            row.update(reference=ex.target, prediction=best)
        return mode, rows
    ends = [em.tokenizer.eos_token, *em.stop_texts]
    gens = generate(em, [r.prompt for r in rendered], settings.max_new_tokens, settings.do_sample,
                    settings.temperature, settings.top_p, settings.stop_strings, settings.batch_size, settings.seed)
    for row, r, g in zip(rows, rendered, gens):
        row.update(reference=answer_text(r.target, ends), prediction=answer_text(g.text, ends),
                   ended_with_eos=g.ended_with_eos, num_tokens=g.num_tokens)
    return mode, rows


def answer_text(text: str, ends: list[str]) -> str:
    """What metrics compare of a target or a generation: without the end of turn the run trained (the tokenizer's
    EOS, or a chat template's own end such as <|im_end|>) and, after a reasoning template's think block, the reply
    alone (the text after '</think>'), so that a reasoning run is scored on its answers."""
    for end in ends:
        text = text.strip().removesuffix(end) if end else text
    return text.rsplit(THINK_CLOSE, 1)[-1].strip()


def evaluate(em: EvalModel, data: EvalData, settings: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The JSON summary and the per-example predictions."""
    mode, rows = predict(em, data, settings)
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    labels = closed_label_set(data.examples, data.pool)
    names = settings.metrics or default_metrics(mode, refs, labels)
    scores = compute(names, preds, refs)
    options = label_options(data) if mode == "score" else labels or []
    for r in rows:
        r["correct"] = normalize(r["prediction"]) == normalize(r["reference"])
    summary: dict[str, Any] = {
        "model": em.name, "data": data.path, "num_examples": len(rows), "mode": mode, "metrics": scores,
        "baselines": baselines(mode, names, data.examples, data.pool, options, refs, settings.seed),
        "label_task": labels is not None,  # a closed set of training targets: scored as labels (evaluate/labels.py)
        "rendering": {"render": data.spec.mode, "template": data.spec.template.model_dump() if data.spec.template else None,
                      "num_shots": data.spec.num_shots, "chat_template": data.spec.chat_template is not None,
                      "max_length": data.data_cfg.max_length},
        "settings": settings.model_dump(mode="json"),  # the resolved eval: section it ran with
    }
    if mode == "generate":
        summary["num_options"] = len(options) if labels else None
        summary["eos_rate"] = sum(r["ended_with_eos"] for r in rows) / len(rows)
        summary["mean_output_tokens"] = sum(r["num_tokens"] for r in rows) / len(rows)
    else:
        summary["num_options"] = len(options)
    return summary, rows


def load_eval_data(path: str, data_cfg: DataConfig, spec: RenderSpec, train_path: str | None,
                   max_examples: int | None, seed: int) -> EvalData:
    examples = sample(load_examples(path, data_cfg), max_examples, seed)
    pool = load_examples(train_path, data_cfg.sources()[0]) if train_path else []
    check_same_shape(pool, str(train_path), examples, path)
    return EvalData(examples, data_cfg, spec, pool, path)


@dataclass(frozen=True)
class PlainReading:
    """How to read and render an eval file that no training config describes (`tunelab eval`'s flags)."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> the file's column
    max_length: int = 1024
    template: str | None = None  # a discrete prompt template; None: the records' own prompt
    target_template: str = "{target}"
    num_shots: int = 0
    train_file: str | None = None  # where demonstrations and label options come from


def load_eval_file(path: str, settings: EvalConfig, cfg: Any = None, plain: PlainReading = PlainReading()) -> EvalData:
    """An eval file rendered as training rendered its data: as the training config `cfg` says (a run's own, or
    `--config`'s), else as `plain` says. A seeded sample of settings.max_examples."""
    from tunelab.data.render import spec_from_config

    if cfg is not None:
        data_cfg = cfg.data.model_copy(update={"max_examples": None})
        return load_eval_data(path, data_cfg, spec_from_config(cfg), cfg.data.train_path, settings.max_examples,
                              settings.seed)
    data_cfg = DataConfig(train=path, format=plain.format, columns=plain.columns, max_length=plain.max_length)
    template = Template(prompt=plain.template, target=plain.target_template) if plain.template else None
    spec = RenderSpec(template=template, num_shots=plain.num_shots, seed=settings.seed)
    return load_eval_data(path, data_cfg, spec, plain.train_file, settings.max_examples, settings.seed)


def write_outputs(summary: dict[str, Any], rows: list[dict[str, Any]], output: str | None,
                  predictions: str | None) -> None:
    if output:
        Path(output).write_text(json.dumps(summary, indent=2))
    if predictions:
        Path(predictions).write_text("".join(json.dumps(r) + "\n" for r in rows))


def eval_data_from_config(cfg: Any, max_examples: int | None = None) -> EvalData:
    """The held-out examples of a training config (data.eval, or the seeded data.eval_fraction split)."""
    from tunelab.data.dataset import split_eval
    from tunelab.data.render import spec_from_config

    train = sample(load_examples(cfg.data.train_path, cfg.data.sources()[0]), cfg.data.max_examples, cfg.train.seed)
    if cfg.data.eval is not None:
        evals, path = load_examples(cfg.data.eval, cfg.data), cfg.data.eval
        check_same_shape(train, cfg.data.train_path, evals, path)
    elif cfg.data.eval_fraction is not None:
        train, evals = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
        path = f"{cfg.data.train_path} (held-out {cfg.data.eval_fraction:g})"
    else:
        raise DataError("the config has no eval data: set data.eval or data.eval_fraction.")
    limit = max_examples or cfg.data.max_eval_examples
    return EvalData(sample(evals, limit, cfg.train.seed), cfg.data, spec_from_config(cfg), train, path)
