"""Fixtures of the export tests: SmolLM2-135M-Instruct as the real-model tier converts it (tests/real_model/conftest.py:
once per machine, cached by the GGUF file's hash), and finished tunelab runs on it (a LoRA run and a full run,
trained a few steps once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import config_tree, write_jsonl
from tests.real_model.conftest import smollm2, smollm2_gguf  # noqa: F401  (the shared conversion)

# the training rows: short chats, a fixed system prompt in some (what the runs learn is beside the point: the
# exported file must answer as the tuned model does, whatever it learned)
TRAIN_CHATS = [{"messages": ([{"role": "system", "content": "You answer in one short sentence."}] if i % 2 else []) + [
    {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (q, a) in enumerate([("What colour is the sky?", "The sky is blue."),
                                ("Name a fruit.", "An apple is a fruit."),
                                ("What do cats say?", "Cats say meow."),
                                ("Where is Paris?", "Paris is in France.")])]
# held-out inputs: 20 conversations the runs never saw, with and without a system turn, one with earlier turns
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is two plus two?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "What is the largest planet?",
             "Give me a synonym for happy.", "How many legs does a spider have?", "What is water made of?",
             "Translate 'thank you' into Spanish.", "What day comes after Monday?", "Name a famous painter.",
             "What is the opposite of hot?", "Why do birds fly south?", "What is the boiling point of water?",
             "Suggest a name for a dog.", "What is a triangle?", "How do plants make food?", "Tell me a joke."]
HELD_OUT = [{"messages": ([{"role": "system", "content": "You are a concise assistant."}] if i % 3 == 0 else []) + [
    {"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)] + [{"messages": [
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the capital of Italy?"}]}]


def train_run(model: Path, out: Path, strategy: dict, rows: list[dict] = TRAIN_CHATS, **train: object) -> Path:
    """A finished tunelab run (a few steps) of `strategy` on `model`."""
    from tunelab.config import validate_config
    from tunelab.train.loop import train as run_training

    data = write_jsonl(out.parent / f"{out.name}-train.jsonl", rows)
    settings = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, **train}
    run_training(validate_config(config_tree(model, data, out, strategy=strategy, data={"max_length": 64},
                                             train=settings)))
    return out


@pytest.fixture(scope="session")
def held_out_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("held-out") / "held_out.jsonl", HELD_OUT)


@pytest.fixture(scope="session")
def smollm2_lora_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(smollm2, tmp_path_factory.mktemp("runs") / "lora",
                     {"name": "lora", "lora": {"dropout": 0.0, "rank": 8}}, learning_rate=5e-3)


@pytest.fixture(scope="session")
def smollm2_full_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(smollm2, tmp_path_factory.mktemp("runs") / "full", {"name": "full"}, learning_rate=1e-4)
