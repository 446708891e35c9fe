"""Only target tokens carry labels, for every record shape, including multi-turn chat."""

from __future__ import annotations

import pytest

from tunelab.config import Template
from tunelab.data.encode import IGNORE, EncodeStats, encode_examples
from tunelab.data.read import Record
from tunelab.data.records import to_examples
from tunelab.data.render import RenderSpec, render_example


def _encode(rows, tokenizer, spec=RenderSpec(), shape="auto", columns=None, max_length=256, truncation="left"):
    examples = to_examples([Record(r, f"test:{i + 1}", i) for i, r in enumerate(rows)], shape, columns)
    rendered = [render_example(e, spec, tokenizer, examples) for e in examples]
    stats = EncodeStats()
    return examples, rendered, encode_examples(rendered, tokenizer, max_length, truncation, stats), stats


def _labeled_runs(enc, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of labeled tokens (the decoder drops one leading space)."""
    runs, current = [], []
    for tok_id, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == tok_id
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("row, target", [
    ({"prompt": "Q: what is two plus two?\nA:", "completion": " four"}, " four</s>"),
    ({"instruction": "Name a colour.", "input": "", "output": "Red"}, "Red</s>"),
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, "5</s>"),
    ({"text": "I lost my card", "label": "lost_or_stolen_card"}, " lost_or_stolen_card</s>"),
])
def test_only_the_target_is_labeled(tokenizer, row, target):
    _, rendered, (enc,), _ = _encode([row], tokenizer)
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE
    assert _labeled_runs(enc, tokenizer) == [target.removeprefix(" ")]
    assert rendered[0].target == target
    assert enc.labels[-1] == tokenizer.eos_token_id
    assert enc.num_label_tokens == sum(1 for label in enc.labels if label != IGNORE)


def test_plain_text_trains_every_token(tokenizer):
    _, _, (enc,), _ = _encode([{"text": "Once upon a time"}], tokenizer)
    assert enc.labels[0] == IGNORE  # BOS: nothing predicts it
    assert enc.labels[1:] == enc.input_ids[1:]
    assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_multi_turn_chat_labels_every_assistant_turn(tokenizer):
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]}
    _, rendered, (enc,), _ = _encode([chat], tokenizer)
    assert _labeled_runs(enc, tokenizer) == ["Hello there</s>", "See you</s>"]
    assert "User: Bye" in rendered[0].text and "Be brief." in rendered[0].text
    _, _, (last,), _ = _encode([chat], tokenizer, RenderSpec(last_turn_only=True))
    assert _labeled_runs(last, tokenizer) == ["See you</s>"]


def test_tokenizer_chat_template_is_used(tokenizer):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    _, rendered, (enc,), _ = _encode([chat], tokenizer, RenderSpec(chat_template=template))
    assert rendered[0].text == "<|user|>Hi<|assistant|>Yo</s>"  # HF renders with trim_blocks
    assert _labeled_runs(enc, tokenizer) == ["Yo</s>"]


def test_discrete_template_with_few_shot_demonstrations(tokenizer):
    rows = [{"text": f"message {i}", "label": f"intent_{i}"} for i in range(6)]
    spec = RenderSpec(template=Template(prompt="Message: {text}\nIntent:", target=" {label}", instruction="Classify."),
                      num_shots=2, seed=3)
    examples, rendered, encoded, _ = _encode(rows, tokenizer, spec)
    for ex, r, enc in zip(examples, rendered, encoded):
        assert r.text.startswith("Classify.\n\n") and r.text.count("Intent:") == 3
        assert f"Message: {ex.fields['text']}\nIntent: {ex.fields['label']}</s>" in r.text
        assert r.text.count(f" {ex.fields['label']}") == 1  # never its own demonstration
        assert _labeled_runs(enc, tokenizer) == [f"{ex.fields['label']}</s>"]
    again = _encode(rows, tokenizer, spec)[1]
    assert [r.text for r in again] == [r.text for r in rendered]  # same seed, same demonstrations


def test_few_shot_demonstrations_do_not_depend_on_the_data_files_folder(tokenizer):
    """The same file in another folder (a fresh clone, the demo's --out) gets the same demonstrations."""
    rows = [{"text": f"message {i}", "label": f"intent_{i}"} for i in range(12)]
    spec = RenderSpec(template=Template(prompt="Message: {text}\nIntent:", target=" {label}"), num_shots=3, seed=0)

    def rendered_from(folder: str) -> list[str]:
        examples = to_examples([Record(r, f"{folder}/train.jsonl:{i + 1}", i) for i, r in enumerate(rows)], "auto")
        return [render_example(e, spec, tokenizer, examples).text for e in examples]

    assert rendered_from("/runs/a/data") == rendered_from("/tmp/elsewhere/data")
    assert len(set(rendered_from("/runs/a/data"))) == len(rows)


def test_column_mapping(tokenizer):
    rows = [{"question": "2+2?", "answer": " 4"}]
    examples, _, (enc,), _ = _encode(rows, tokenizer, columns={"prompt": "question", "completion": "answer"})
    assert examples[0].shape == "prompt_completion"
    assert _labeled_runs(enc, tokenizer) == ["4</s>"]


def test_truncation_policies(tokenizer):
    rows = [{"prompt": "word " * 100, "completion": " short"}, {"prompt": "hi", "completion": " ok"}]
    _, _, encoded, stats = _encode(rows, tokenizer, max_length=32, truncation="left")
    assert len(encoded[0].input_ids) == 32 and encoded[0].input_ids[0] == tokenizer.bos_token_id
    assert _labeled_runs(encoded[0], tokenizer) == ["short</s>"]
    assert (stats.prompts_truncated, stats.targets_truncated, stats.dropped) == (1, 0, 0)
    _, _, encoded, stats = _encode(rows, tokenizer, max_length=32, truncation="drop")
    assert len(encoded) == 1 and stats.dropped == 1 and stats.dropped_sources == ["test:1"]
    # a target longer than max_length keeps its start and is counted as cut
    _, _, (enc,), stats = _encode([{"prompt": "hi", "completion": " long" * 50}], tokenizer, max_length=16)
    assert len(enc.input_ids) == 16 and stats.targets_truncated == 1


def test_pretokenized_records_are_used_as_given():
    from tunelab.data.encode import encode_pretokenized

    rows = [{"prompt_ids": [5, 6, 7, 8], "completion_ids": [9, 10]}, {"prompt_ids": [11] * 20, "completion_ids": [12, 2]}]
    examples = to_examples([Record(r, f"t:{i + 1}", i) for i, r in enumerate(rows)])
    assert examples[0].shape == "tokenized"
    stats = EncodeStats()
    first, second = encode_pretokenized(examples, max_length=8, stats=stats)
    assert first.input_ids == [5, 6, 7, 8, 9, 10] and first.labels == [IGNORE] * 4 + [9, 10]
    assert second.input_ids == [11] * 6 + [12, 2] and second.labels[-2:] == [12, 2]  # prompt cut from the left
    assert stats.prompts_truncated == 1 and stats.num_label_tokens == 4
    with pytest.raises(Exception, match="t:1: field 'completion_ids' must be a list of non-negative token ids"):
        to_examples([Record({"prompt_ids": [1], "completion_ids": ["a"]}, "t:1", 0)])
