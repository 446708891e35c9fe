"""Bad input to `tunelab export --format gguf|ollama|vllm`: one paragraph, exit 2 (1 for a full disk), and nothing
left under OUT's name."""

from __future__ import annotations

import errno
import json
from pathlib import Path


from tunelab.cli import main


def _run(tmp_path: Path, architecture: str = "LlamaForCausalLM", adapter: dict | None = None) -> Path:
    """A run directory whose final/ holds just enough for the checks that come before any writing."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "x"}))
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    if adapter is None:
        (final / "config.json").write_text((base / "config.json").read_text())
    else:
        (final / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(base)}))
    return tmp_path / "run"


def _fails(capsys, argv: list[str], code: int, *phrases: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") <= 1, err
    for phrase in phrases:
        assert phrase in err, err
    return err


def test_a_run_without_final(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    _fails(capsys, ["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "gguf"], 2, "has no final/")
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    run = _run(tmp_path, "OPTForCausalLM")
    _fails(capsys, ["export", str(run), str(tmp_path / "out"), "--format", "gguf"], 2, "OPTForCausalLM",
           "llama (LlamaForCausalLM)", "qwen3 (Qwen3ForCausalLM)", "Nothing was written")
    assert not (tmp_path / "out").exists()


def test_an_unknown_quant_type(tmp_path, capsys):
    run = _run(tmp_path)
    _fails(capsys, ["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--quant", "q3_k"], 2, "'q3_k'",
           "f32, f16, bf16, q8_0, q4_k_m")


def test_an_unknown_format(tmp_path, capsys):
    _fails(capsys, ["export", str(_run(tmp_path)), str(tmp_path / "out"), "--format", "onnx"], 2, "'onnx'", "gguf")


def test_an_existing_output_without_overwrite(tmp_path, capsys):
    run = _run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _fails(capsys, ["export", str(run), str(tmp_path / "out"), "--format", "gguf"], 2, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_soft_prompt_cannot_be_merged_into_weights(tmp_path, capsys):
    run = _run(tmp_path, adapter={"peft_type": "PROMPT_TUNING"})
    _fails(capsys, ["export", str(run), str(tmp_path / "out"), "--format", "gguf"], 2, "prompt tuning adapter",
           "no weight to merge it into")
    _fails(capsys, ["export", str(run), str(tmp_path / "out2"), "--format", "vllm"], 2, "LoRA adapters only")


def test_a_disk_that_fills_half_way_leaves_no_file_under_the_final_name(tmp_path, capsys, monkeypatch):
    from tunelab.export import gguf, llamacpp

    run = _run(tmp_path)
    carried = {"chat_template": None, "turn_end": "</s>", "end_ids": [2]}
    monkeypatch.setattr(gguf, "write_merged", lambda source, out: out.mkdir() or carried)

    def half_written(model_dir: Path, out_file: Path, outtype: str) -> None:
        out_file.write_bytes(b"GGUF" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llamacpp, "convert", half_written)
    _fails(capsys, ["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--quant", "f32"], 1, "is full",
           "half-written copy was removed")
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"base", "run"}  # no temporary folder left either
