"""`tunelab plan` from the command line: the figures in plan.json, and what to change when a run does not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from transformers import LlamaConfig

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main

LLAMA2_7B_PARAMS = 6_738_415_616  # the published count of Llama 2 7B (config: hidden 4096, 32 layers, vocab 32000)


def _llama2_7b_folder(tmp_path, stories260k):
    """Config and tokenizer only: planning reads no weights, so a 7B model is planned on this CPU."""
    out = tmp_path / "llama2-7b-config"
    out.mkdir()
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / name, out / name)
    return out


def test_plan_json_and_what_to_change(tmp_path, stories260k, capsys):
    tree = config_tree(_llama2_7b_folder(tmp_path, stories260k), write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS),
                       tmp_path / "run", train={"max_steps": 100, "batch_size": 8})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["plan", str(cfg), "--gpu", "l4", "--gpu", "h100", "--output", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    h100 = json.loads((tmp_path / "plan-h100.json").read_text())
    l4 = json.loads((tmp_path / "plan-l4.json").read_text())

    full, lora = h100["strategies"]["full"], h100["strategies"]["lora"]
    assert full["total_params"] == full["trainable_params"] == LLAMA2_7B_PARAMS
    mem = full["memory_bytes"]
    # fp32 master weights, gradients and AdamW's two states: 16 bytes per trained parameter
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * LLAMA2_7B_PARAMS, 4 * LLAMA2_7B_PARAMS,
                                                                    8 * LLAMA2_7B_PARAMS)
    assert mem["total"] == sum(v for k, v in mem.items() if k not in ("total", "activations_with_checkpointing"))
    # 6 N per trained token, within the attention term and the head's computed only at target tokens
    tokens = full["flops"] / (6 * LLAMA2_7B_PARAMS)
    assert 100 * 8 * 10 < tokens < 100 * 8 * 128
    assert full["seconds"] == pytest.approx(full["flops"] / (989e12 * 0.35))
    assert lora["trainable_params"] < LLAMA2_7B_PARAMS / 100 and lora["flops"] < full["flops"]

    # 108 GB of full-tuning state does not fit an 80 GB H100: plan says what would, with figures
    assert full["fit_changes"] and lora["fit_changes"] == []
    assert any(c.startswith("another strategy: ") and "lora (" in c for c in full["fit_changes"])
    gpus = next(c for c in full["fit_changes"] if "fsdp2" in c)
    assert int(gpus.split()[0]) >= 2
    assert "full does not fit NVIDIA H100" in out and "to fit, change one of:" in out
    # on a 24 GB L4 not even a soft prompt's frozen fp32 weights fit, but LoRA over a 4-bit NF4 base does (issue 35:
    # before it, the advice was LoRA sharded over GPUs by FSDP2): its memory and its step-time cost are given
    assert l4["strategies"]["soft_prompt"]["fit_changes"] and l4["strategies"]["lora"]["fit_changes"]
    qlora_line = l4["strategies"]["lora"]["fit_changes"][0]
    assert qlora_line.startswith("strategy.lora.quantize: nf4 (QLoRA") and "x LoRA's time" in qlora_line
    assert l4["recommendation"]["strategy"] == "lora"
    assert l4["recommendation"]["settings"]["quantize"] == "nf4"
    qlora_gib = float(qlora_line.split(" GiB")[0].rsplit(" ", 1)[1])
    assert qlora_gib < 24e9 / 2**30 < l4["strategies"]["lora"]["memory_bytes"]["total"] / 2**30
    assert f"{qlora_gib:.1f} GiB" in l4["recommendation"]["reasons"]
    assert h100["recommendation"]["strategy"] == "lora"
    assert h100["strategies"]["lora"]["recommendation"]["reasons"] == h100["recommendation"]["reasons"]


def test_plan_without_a_model_folder(tmp_path, capsys):
    tree = config_tree(tmp_path / "no-such-model", write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["plan", str(cfg), "--gpu", "h100"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no-such-model" in err and "config.json" in err


def test_smaller_micro_batches_when_activations_do_not_fit(tmp_path, stories260k):
    """A ~1B model with 65,536 tokens per micro-batch: the activations, not the weights, overflow an L4."""
    from tunelab.config import validate_config
    from tunelab.plan.run import plan

    folder = tmp_path / "one-b"
    folder.mkdir()
    LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                vocab_size=32000, tie_word_embeddings=True).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / name, folder / name)
    tree = config_tree(folder, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       train={"max_steps": 10, "tokens_per_step": 65536})
    full = plan(validate_config(tree), "l4", strategies=["full"]).estimates["full"]
    assert full.memory_bytes["total"] > 24e9 and full.memory_bytes["activations"] > 24e9
    change = next(c for c in full.fit_changes if c.startswith("train.tokens_per_micro_batch: "))
    micro = int(change.split()[1])
    # the suggested micro-batch, planned again, fits (with the activation checkpointing it names)
    tree["train"].update(tokens_per_micro_batch=micro, activation_checkpointing=True)
    again = plan(validate_config(tree), "l4", strategies=["full"]).estimates["full"]
    assert again.memory_bytes["total"] <= 24e9 and not again.fit_changes
    assert f"{again.memory_bytes['total'] / 2**30:.1f} GiB" in change
    assert 65536 % micro == 0 and micro < 65536
    tree["train"]["tokens_per_micro_batch"] = micro * 2  # and it is the largest halving that fits
    assert plan(validate_config(tree), "l4", strategies=["full"]).estimates["full"].memory_bytes["total"] > 24e9
