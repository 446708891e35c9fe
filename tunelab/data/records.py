"""Record shapes: detect which one a file holds and turn each row into an `Example`.

Shapes: `prompt_completion` (prompt, completion), `chat` (messages), `instruction` (instruction,
input, output), `text_label` (text, label), `text` (plain text, loss on every token) and
`tokenized` (prompt_ids, completion_ids: token ids used as given). A chat's assistant turn may carry
`reasoning_content` (a reasoning model's thinking; a `<think>...</think>` prefix of its content works too). A column
mapping (`data.columns: {canonical: file_column}`) covers files that use other names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.data.read import Record
from tunelab.errors import DataError

# shape -> (required fields, optional fields, the field that holds the target)
SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "chat": (("messages",), (), "messages"),
    "prompt_completion": (("prompt", "completion"), (), "completion"),
    "instruction": (("instruction", "output"), ("input",), "output"),
    "text_label": (("text", "label"), (), "label"),
    "text": (("text",), (), "text"),
    "tokenized": (("prompt_ids", "completion_ids"), (), "completion_ids"),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """A record in canonical form: `fields` holds the shape's fields as strings (or `messages`)."""

    shape: str
    fields: dict[str, Any]
    source: str
    row: int
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other columns, for templates

    @property
    def target(self) -> str:
        """The text the model should produce (for chat: the last assistant turn)."""
        if self.shape == "chat":
            return next(m["content"] for m in reversed(self.fields["messages"]) if m["role"] == "assistant")
        return self.fields[SHAPES[self.shape][2]]


def _fields(shape: str, values: dict[str, Any], rec: Record, names: tuple[str, ...], target_field: str,
            columns: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in names:
        what = f"field '{name}'" + (f" (column '{columns[name]}')" if name in columns else "")
        if name == "messages":
            fields[name] = _messages(values[name], rec)
        elif shape == "tokenized":
            fields[name] = _token_ids(values[name], what, rec)
        else:
            fields[name] = _as_text(values.get(name), what, rec)
    if shape != "chat" and not (fields[target_field].strip() if shape != "tokenized" else fields[target_field]):
        raise EmptyTargetError(f"{rec.source}: the target field '{target_field}' is empty. Every example needs an "
                               "output to train on: fill it in or remove the line.")
    return fields


def detect_shape(columns: set[str], where: str) -> str:
    """The first shape whose required fields are all present."""
    for shape, (required, _, _) in SHAPES.items():
        if set(required) <= columns:
            return shape
    raise DataError(
        f"{where}: cannot tell the record shape from the columns {sorted(columns)}. tunelab reads "
        "prompt/completion, messages, instruction/input/output, text/label or text. Name the columns "
        "with data.columns (e.g. data.columns: {label: category}) or set data.format."
    )


def _as_text(value: Any, what: str, record: Record) -> str:
    """A text field as a string; None (a missing optional value) is empty text.

    A number or a boolean is refused rather than stringified: the model would be trained to write
    `1.0` or `True` (a float label is usually an integer column that a missing value turned into
    floats, and an id is not the name of the class it stands for).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{record.source}: {what} holds an unpaired surrogate {value[exc.start]!r} at "
                            f"character {exc.start} (a broken \\u escape such as \\ud83d without its pair), which "
                            "is not text a tokenizer can read. Fix the escape or remove the character.") from None
        return value
    kind = {bool: "a boolean", int: "an integer", float: "a float"}.get(type(value), f"a {type(value).__name__}")
    hint = (" Store the column as strings, mapping class ids to the names of their classes (the model learns "
            "words better than ids), or to their digits ('1') if the digits are the answer."
            if isinstance(value, (bool, int, float)) else "")
    raise DataError(f"{record.source}: {what} must be text, but it holds {kind} ({repr(value)[:80]}).{hint}")


def _token_ids(value: Any, what: str, record: Record) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise DataError(f"{record.source}: {what} must be a list of non-negative token ids (integers).")
    return value


def _messages(value: Any, record: Record) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{record.source}: 'messages' must be a non-empty list of {{role, content}} objects.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{record.source}: messages[{i}] must be an object with 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise DataError(f"{record.source}: messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}.")
        message = {"role": m["role"], "content": _as_text(m["content"], f"field 'messages[{i}].content'", record)}
        if m.get("reasoning_content") is not None:  # a reasoning model's thinking, which its chat template renders
            if m["role"] != "assistant":
                raise DataError(f"{record.source}: messages[{i}] is a {m['role']} turn with 'reasoning_content'; only "
                                "assistant turns carry reasoning.")
            message["reasoning_content"] = _as_text(m["reasoning_content"], f"field 'messages[{i}].reasoning_content'",
                                                    record)
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{record.source}: the conversation has no assistant turn, so there is nothing to train on.")
    empty = [i for i, m in enumerate(out) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        raise EmptyTargetError(f"{record.source}: messages[{empty[0]}] is an assistant turn with empty content "
                               "(an empty target).")
    return out


class EmptyTargetError(DataError):
    """A record whose target is empty (an audit lists these instead of stopping)."""


def to_examples(records: list[Record], shape: str = "auto", columns: dict[str, str] | None = None,
                empty_targets: list[tuple[Record, str]] | None = None) -> list[Example]:
    """Map columns, detect (or check) the shape, and validate every record: no missing or empty target.

    With `empty_targets` given, records whose target is empty are collected there (with the reason)
    and left out, instead of stopping at the first one.
    """
    columns = columns or {}
    first = records[0]
    available = set(first.fields)
    missing_cols = [f"{canon} <- {col}" for canon, col in columns.items() if col not in available]
    if missing_cols:
        raise DataError(
            f"{first.source}: data.columns maps {', '.join(missing_cols)}, but the file's columns are "
            f"{sorted(available)}."
        )
    mapped = (available - set(columns.values())) | set(columns)
    if shape == "auto":
        shape = detect_shape(mapped, first.source)
    required, optional, target_field = SHAPES[shape]
    examples = []
    for rec in records:
        values = {canon: rec.fields.get(col) for canon, col in columns.items()}
        values.update({k: v for k, v in rec.fields.items() if k not in values and k not in columns.values()})
        absent = [name for name in required if name not in values]
        if absent:
            raise DataError(
                f"{rec.source}: the record has no '{absent[0]}' field, which the {shape} shape needs "
                f"(fields present: {sorted(values)}). Add it, or map a column to it with data.columns."
            )
        try:
            fields = _fields(shape, values, rec, required + optional, target_field, columns)
        except EmptyTargetError as exc:
            if empty_targets is None:
                raise
            empty_targets.append((rec, str(exc)))
            continue
        extra = {k: v for k, v in values.items() if k not in fields}
        examples.append(Example(shape, fields, rec.source, rec.row, extra))
    return examples


def _describe(shape: str) -> str:
    required, optional, _ = SHAPES[shape]
    return f"{shape} records ({', '.join(required + tuple(f'{o} (optional)' for o in optional))})"


def check_same_shape(train: list[Example], train_path: str, evals: list[Example], eval_path: str) -> None:
    """Refuse eval data of another record shape than the training data.

    Eval examples are rendered with the training data's template and demonstrations and scored
    against its label options, so other fields would be rendered wrongly or fail later, after the
    whole run.
    """
    if train and evals:
        check_same_shapes(train[0].shape, train_path, evals[0].shape, eval_path)


def check_same_shapes(train_shape: str, train_path: str, eval_shape: str, eval_path: str) -> None:
    """`check_same_shape` on the shapes of two files (also: two files of a training mixture)."""
    if train_shape == eval_shape:
        return
    raise DataError(
        f"the file '{eval_path}' holds {_describe(eval_shape)}, but the training file '{train_path}' holds "
        f"{_describe(train_shape)}. Eval data (and every file of a mixture) must have the training data's shape, so "
        "that it is rendered and scored the way the model was trained: convert one of the files, or name the "
        "columns with data.columns."
    )
