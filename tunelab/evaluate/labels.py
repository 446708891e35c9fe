"""Whether a task's targets are labels: a closed set that the training data already holds.

Label data (`text,label` records) is a label task by its shape. Classification is often written another way, as
prompt/completion or chat (`{"prompt": "I lost my card\\nIntent:", "completion": " lost_or_stolen_card"}`); such
data is a label task too when every eval target was seen in training and the distinct targets are few, and it is
then scored as one (accuracy, macro-F1, the majority and chance baselines) whether the model generates its answer
or ranks the labels (`--mode score`)."""

from __future__ import annotations

from tunelab.data.records import Example

MAX_LABELS = 100  # more distinct targets than this is free text, however often they repeat (one is no choice)
MIN_EXAMPLES_PER_LABEL = 2  # on average, in the training data: targets seen once each are not labels


def closed_label_set(examples: list[Example], pool: list[Example]) -> list[str] | None:
    """The labels (stripped, sorted) when the eval targets form a closed set of the training targets, else None."""
    if not examples or not pool or examples[0].shape in ("text", "tokenized"):
        return None
    if examples[0].shape == "text_label":
        return sorted({ex.target.strip() for ex in examples} | {ex.target.strip() for ex in pool})
    seen = {ex.target.strip() for ex in pool}
    if not 2 <= len(seen) <= MAX_LABELS or len(pool) < MIN_EXAMPLES_PER_LABEL * len(seen):
        return None
    return sorted(seen) if all(ex.target.strip() in seen for ex in examples) else None
