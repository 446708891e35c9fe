"""`tunelab convert gguf` on SmolLM2-135M-Instruct's GGUF file: the folder is what transformers' own GGUF loader
builds (same logits, same tokenizer and chat template), with every end id in its generation config; bad input
(not GGUF, cut short, an architecture the loader cannot build, an existing OUT_DIR) exits 2 with one paragraph
and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunelab.cli import main

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]


@pytest.mark.slow
def test_the_folder_is_what_transformers_gguf_loader_builds(smollm2, smollm2_gguf, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = smollm2_gguf.parent, smollm2_gguf.name
    reference_tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tok = smollm2_tokenizer
    text = tok.apply_chat_template(CHAT, tokenize=False) + "Ünïcode, digits 12345 and\ttabs."
    assert tok.chat_template == reference_tok.chat_template and "<|im_start|>system" in tok.chat_template
    assert tok(text)["input_ids"] == reference_tok(text)["input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    # every end id: <|im_end|> (the file's EOS) and <|endoftext|> (an end of generation for llama.cpp)
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    reference = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris.")


def _tiny_gguf(path, architecture: str):
    """A small well-formed GGUF file of `architecture` (one tensor, an EOS id), written by gguf's own writer."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bad_inputs(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    cut = {"first_1MB": data[: 1 << 20], "half": data[: len(data) // 2]}  # in the metadata; in the tensors
    files = {name: tmp_path / f"{name}.gguf" for name in cut}
    for name, part in cut.items():
        files[name].write_bytes(part)
    files["not_gguf"] = tmp_path / "model.safetensors.gguf"
    files["not_gguf"].write_bytes(b'{"not": "a gguf file"}' * 10)
    files["rwkv6"] = _tiny_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    return files


def test_bad_input_exits_2_and_writes_nothing(tmp_path, smollm2_gguf, capsys):
    (tmp_path / "in").mkdir()
    files = _bad_inputs(tmp_path / "in", smollm2_gguf)
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [(files["first_1MB"], "damaged or cut short"), (files["half"], "damaged or cut short"),
             (files["not_gguf"], "not a GGUF file"), (files["rwkv6"], "'rwkv6' model, an architecture that"),
             (tmp_path / "missing.gguf", "does not exist"), (smollm2_gguf, "already exists")]
    for path, what in cases:
        out = existing if what == "already exists" else tmp_path / "out" / path.stem
        code = main(["convert", "gguf", str(path), str(out)])
        err = capsys.readouterr().err
        assert code == 2, (path, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err and what in err, err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), path
    assert not any(existing.iterdir())  # the existing OUT_DIR untouched


def test_a_failed_write_leaves_no_folder(tmp_path, stories260k, monkeypatch, capsys):
    """A write that fails part-way (here the tokenizer's, after the weights) removes the half-written folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunelab.models.gguf as converter

    tok = AutoTokenizer.from_pretrained(stories260k)
    model = AutoModelForCausalLM.from_pretrained(stories260k)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", fail)
    monkeypatch.setattr(converter, "_load", lambda path, dtype: (model, tok))
    with pytest.raises(OSError):
        converter.convert_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "llama"), tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_gguf_file_as_the_model_path_says_to_convert_it(tmp_path, smollm2_gguf, capsys):
    import yaml

    from tests.conftest import config_tree, write_jsonl

    tree = config_tree(smollm2_gguf, write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": " b"}]),
                       tmp_path / "run")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"tunelab convert gguf {smollm2_gguf} OUT_DIR" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
