"""Fixtures of the export tests: SmolLM2-135M-Instruct as the real-model tier converts it (tests/real_model/conftest.py:
once per machine, cached by the GGUF file's hash), and finished tunelab runs on it (a LoRA run and a full run,
trained a few steps once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import config_tree, write_jsonl
from tests.real_model.conftest import made_once, smollm2, smollm2_gguf  # noqa: F401  (the shared conversion)

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


def llama_cpp_tokenizer(name: str) -> Path:
    """A real tokenizer from the vocabulary files llama.cpp tests its own tokenizers with (models/ggml-vocab-NAME.gguf
    in the source release of the installed llama-cpp-python, fetched with pip as the export fetches llama.cpp's
    converter), made a Hugging Face tokenizer folder by transformers' GGUF loader: for a family whose transformers
    tokenizer class replaces SmolLM2's pre-tokenizer (Qwen2), so that llama.cpp's converter meets a vocabulary it
    knows. Made once per machine, in the test model cache."""
    import tarfile
    from importlib.metadata import version

    from transformers import AutoTokenizer

    from tunelab.export.llamacpp import download_source_release

    release = version("llama-cpp-python")

    def make(out: Path) -> None:
        archive = download_source_release(release, out.parent)
        member = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/models/ggml-vocab-{name}.gguf"
        with tarfile.open(archive) as tar:
            tar.extractall(out.parent, members=[tar.getmember(member)], filter="data")
        vocab = out.parent / member
        AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name).save_pretrained(out)

    return made_once(f"llama.cpp-{release}-vocab-{name}", make)


def sentencepiece_tokenizer() -> Path:
    """A sentencepiece tokenizer (a real tokenizer.model, as Gemma 2 and Phi-3 ship one, which llama.cpp's converter
    reads for their families): BPE with byte fallback, 1,000 pieces learned from the first 2,000 GSM8K training rows
    of ../shared/data, ChatML's markers as its own symbols, Gemma's special ids (pad 0, eos 1, bos 2, unk 3), saved
    with a GemmaTokenizer config (transformers converts it, to the same ids as sentencepiece itself). Made once per
    machine, in the test model cache."""
    import io
    import json

    import sentencepiece

    from tests.conftest import shared_file

    def make(out: Path) -> None:
        rows = [json.loads(line) for line in shared_file("gsm8k/train.jsonl").read_text().splitlines()[:2000]]
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(r["question"] + "\n" + r["answer"] for r in rows), model_writer=model,
            vocab_size=1000, model_type="bpe", byte_fallback=True, split_digits=True,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, minloglevel=2)
        out.mkdir()
        (out / "tokenizer.model").write_bytes(model.getvalue())
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>"}))

    return made_once(f"sentencepiece-gsm8k-{sentencepiece.__version__}", make)
