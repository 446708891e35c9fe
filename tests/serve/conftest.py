"""Tiny tuned runs over stories260K for the server's tests: two LoRA runs (a chat template, a discrete template) and
a soft-prompt run, all over the same base, trained far enough that each answers differently from the base."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import config_tree, write_jsonl
from tunelab.config import validate_config

QA = [{"question": f"What colour is the {t}?", "answer": c} for t, c in
      [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("sun", "yellow"), ("rose", "red")]]
# ChatML, as Qwen2.5's tokenizer_config.json writes it (without the tool-call branches)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TRAIN = {"max_steps": 8, "learning_rate": 1e-2}


def _train(root: Path, base: Path, name: str, rows: list[dict], **sections) -> Path:
    from tunelab.train.loop import train

    tree = config_tree(base, write_jsonl(root / f"{name}.jsonl", rows), root / name, train=TRAIN, **sections)
    train(validate_config(tree))
    return root / name


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory: pytest.TempPathFactory, stories260k: Path) -> dict[str, Path]:
    """{'chat': LoRA with ChatML, 'qa': LoRA with a Q:/A: template, 'soft': prompt tuning with the template}."""
    root = tmp_path_factory.mktemp("serve-runs")
    chat_rows = [{"messages": [{"role": "system", "content": "Answer in one word."},
                               {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
                 for r in QA]
    template = {"prompt": "Q: {prompt}\nA:", "target": " {completion}"}
    columns = {"columns": {"prompt": "question", "completion": "answer"}}
    return {
        "chat": _train(root, stories260k, "chat", chat_rows, data={"chat_template": CHATML},
                       strategy={"name": "lora"}),
        "qa": _train(root, stories260k, "qa", QA, data=columns, strategy={"name": "lora", "template": template}),
        "soft": _train(root, stories260k, "soft", QA, data=columns,
                       strategy={"name": "soft_prompt", "template": template, "soft_prompt": {"method": "prompt_tuning"}}),
    }
