"""`--format vllm`: an adapter is checked against what vLLM's LoRA loads (peft's LoRA layout, plain LoRA, linear
target modules of the family, a rank vLLM is built for) and the `vllm serve` command is printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.cli import main

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "use_dora": False, "modules_to_save": None,
        "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _adapter_run(tmp_path: Path, architecture: str = "LlamaForCausalLM", **changes) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({**LORA, **changes, "base_model_name_or_path": str(base)}))
    (final / "adapter_model.safetensors").write_bytes(b"weights")
    return tmp_path / "run"


def test_a_lora_adapter_is_copied_and_the_serve_command_printed(tmp_path, capsys):
    run = _adapter_run(tmp_path, r=32)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "vllm"]) == 0
    out = capsys.readouterr().out
    assert (f"vllm serve {tmp_path / 'base'} --enable-lora --lora-modules run={(tmp_path / 'out').resolve()} "
            "--max-lora-rank 32") in out
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("changes, phrase", [
    ({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "trains biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"target_modules": ["q_proj", "rotary"]}, "['rotary']"),
    ({"r": 12}, "rank r=12"), ({"peft_type": "IA3"}, "LoRA adapters only")])
def test_what_vllm_does_not_load_is_refused_before_writing(tmp_path, capsys, changes, phrase):
    run = _adapter_run(tmp_path, **changes)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "vllm"]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_family_whose_vllm_model_takes_no_lora_is_refused(tmp_path, capsys):
    run = _adapter_run(tmp_path, "GPTNeoXForCausalLM", target_modules=["query_key_value"])
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "vLLM has no LoRA support for gpt_neox models" in err and "--merge" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
