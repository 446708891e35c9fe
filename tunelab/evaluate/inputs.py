"""New inputs for a tuned model, rendered exactly as its training data was: `tunelab generate`'s prompts.

An input is a record of the training data's own shape and columns without its target (a prompt, a
question, a conversation ending with a user turn), or one text that fills the shape's prompt field.
It goes through the run's reader and template or chat template, with the same few-shot pool, so the
prompt ids equal those the model was trained after."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.data.dataset import load_examples
from tunelab.data.table import first_shape
from tunelab.data.read import Record, read_records
from tunelab.data.records import SHAPES, Example, to_examples
from tunelab.data.render import Rendered, RenderSpec, render_example, spec_from_config
from tunelab.errors import DataError

# stands in for the absent target (an invisible separator: not whitespace, so records pass the reader's checks);
# rendering puts it after the prompt, which is all that is kept
PLACEHOLDER = "\u2063"


def _with_placeholder(rec: Record, shape: str, target_column: str) -> Record:
    if shape == "chat":
        messages = rec.fields.get(target_column)
        if isinstance(messages, list) and (not messages or not isinstance(messages[-1], dict)
                                           or messages[-1].get("role") != "assistant"):
            return dataclasses.replace(rec, fields={**rec.fields, target_column: [
                *messages, {"role": "assistant", "content": PLACEHOLDER}]})
        return rec
    if str(rec.fields.get(target_column) or "").strip():
        return rec
    return dataclasses.replace(rec, fields={**rec.fields, target_column: PLACEHOLDER})


class Inputs:
    """The training data's shape, reader settings, rendering and few-shot pool, for new inputs.

    Without a run config (a plain model), inputs are conversations rendered with the model's own chat template
    (tunelab's fallback where it has none), as a chat-shaped training run on that model would render them."""

    def __init__(self, cfg: Config | None) -> None:
        self.cfg = cfg
        if cfg is None:
            self.pool: list[Example] = []
            self.shape = "chat"
            self.spec = RenderSpec(mode="chat")
            return
        self.spec = spec_from_config(cfg)
        source = cfg.data.sources()[0]
        if self.spec.num_shots:  # the demonstrations come from the training examples, drawn as training drew them
            self.pool = load_examples(source.path, source)
            self.shape = self.pool[0].shape
        else:  # the shape is all that is needed: one record, however large the file
            self.pool = []
            self.shape = first_shape(source.path, source)
        if self.shape in ("text", "tokenized"):
            raise DataError(f"the run trained on {self.shape} records ('{cfg.data.train_path}'), which have no prompt to "
                            "continue: generate from a run trained on prompts and targets.")

    def from_texts(self, texts: list[str]) -> list[Example]:
        """One example per text, the text as the shape's prompt field (a user turn for chat)."""
        out = []
        for i, text in enumerate(texts):
            if self.shape == "chat":
                fields: dict[str, Any] = {"messages": [{"role": "user", "content": text},
                                                       {"role": "assistant", "content": PLACEHOLDER}]}
            else:
                required, optional, target = SHAPES[self.shape]
                fields = {required[0]: text, **{name: "" for name in optional}, target: PLACEHOLDER}
            out.append(Example(self.shape, fields, "--prompt", i + 1))
        return out

    def from_file(self, path: str) -> list[Example]:
        """The records of `path`, read as the training data was; a record's target may be absent or empty."""
        target = SHAPES[self.shape][2]
        columns = self.cfg.data.columns if self.cfg else {}
        column = columns.get(target, target)
        records = [_with_placeholder(r, self.shape, column)
                   for r in read_records(path, self.cfg.data.column_names if self.cfg else None)]
        if not records:
            raise DataError(f"'{path}' holds no records to generate from.")
        return to_examples(records, self.shape, columns)

    def render(self, ex: Example, tokenizer: Any) -> Rendered:
        return render_example(ex, self.spec, tokenizer, self.pool)

    def prompts(self, examples: list[Example], tokenizer: Any) -> list[str]:
        """Each example rendered as training renders it, up to where its target would start."""
        return [self.render(ex, tokenizer).prompt for ex in examples]


def quantized_run_settings(run_dir: Path, num_prompts: int = 4) -> tuple[Any, list[str]]:
    """For a run directory that trained over a quantized base (strategy.lora.quantize): its strategy.lora settings
    and its first `num_prompts` training prompts, rendered as training rendered them (what an export's parity check
    decodes from); (None, []) for any other folder."""
    from tunelab.config import load_config
    from tunelab.models.load import load_tokenizer
    from tunelab.runfiles import RunFiles, is_run_dir

    if not is_run_dir(run_dir):
        return None, []
    cfg = load_config(RunFiles(run_dir).config)
    if cfg.strategy.lora.quantize is None:
        return None, []
    inputs = Inputs(cfg)
    examples = inputs.from_file(cfg.data.train_path)[:num_prompts]
    return cfg.strategy.lora, inputs.prompts(examples, load_tokenizer(cfg.model))
