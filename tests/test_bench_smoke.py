"""The prepared GPU check (bench/gpu_check.py) and its throughput bench run every path on the CPU in smoke mode,
so that neither can rot before a GPU is lent (the figures of smoke mode are not measurements)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"loss_equals_transformers", "packed_equals_padded", "strategies_train", "liger_equals_chunked", "eval_on_device",
          "fsdp2_one_process", "qlora_equals_lora"}


def _gpu_check(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=900)


def test_gpu_check_smoke_runs_every_check_and_the_bench(tmp_path):
    pytest.importorskip("trl", reason="the bench extra (pip install -e .[bench]) is not installed")
    proc = _gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert set(checks) == CHECKS and all(c["ok"] for c in checks.values())
    fp32 = checks["loss_equals_transformers"]["fp32"]  # against transformers' own loss, on the same batch
    assert fp32["loss_rel_diff"] <= 1e-5 and fp32["grad_rel_diff"] <= 1e-3
    assert checks["packed_equals_padded"]["packed_rows"] < checks["packed_equals_padded"]["examples"]
    fsdp2 = checks["fsdp2_one_process"]  # one FSDP2 process trains as the plain single-process run does
    assert fsdp2["losses"] == pytest.approx(fsdp2["single_process_losses"], rel=1e-5)
    assert checks["eval_on_device"]["lora"]["parameters_on"] == ["cpu"]
    assert checks["eval_on_device"]["lora"]["dtypes"] == ["torch.float32"]  # eval.precision auto: fp32 on a CPU
    assert "train.loss_kernel is 'liger'" in checks["liger_equals_chunked"]["refused"]
    qlora = checks["qlora_equals_lora"]  # fp32 on the CPU: a 4-bit layer computes what its dequantized weights do
    assert qlora["loss_rel_diff"] <= 1e-5 and qlora["loss_rel_diff_unquantized"] > 0
    assert qlora["memory_vs_lora"] > 0 and qlora["speed_vs_lora"] > 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in markdown for name in CHECKS) and "| tunelab |" in markdown

    results = report["throughput"]["results"]
    assert set(results) == {"tunelab", "hf_trainer", "trl", "trl_packed"}
    for name, r in results.items():
        assert r["tokens"] > 0 and r["seconds"] > 0 and r["steps"] == 2, name
    # every system consumed about the same number of real tokens per step
    per_step = [r["tokens"] / r["steps"] for r in results.values()]
    assert max(per_step) < 1.6 * min(per_step)
    assert "smoke mode" in proc.stdout
    smollm2 = report["throughput_smollm2"]["lora"]  # SmolLM2's comparison (on the GPU: its shape, LoRA and full)
    assert smollm2["args"]["strategy"] == "lora" and smollm2["results"]["tunelab"]["steps"] == 2


def test_carried_wheels_are_installed_before_the_checks(tmp_path):
    """--wheels: the GPU machine has no network, so the check installs the folder's wheels and runs with them."""
    src = tmp_path / "probe"
    (src / "tunelab_wheel_probe").mkdir(parents=True)
    (src / "tunelab_wheel_probe" / "__init__.py").write_text("__version__ = '1.0'\n")
    (src / "pyproject.toml").write_text('[project]\nname = "tunelab-wheel-probe"\nversion = "1.0"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(src)], check=True, capture_output=True)
    proc = _gpu_check(tmp_path / "out", "--wheels", str(tmp_path / "wheels"), "--checks", "loss_equals_transformers",
                      "--no-throughput")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["environment"]["carried"] == ["tunelab_wheel_probe-1.0.dist-info"]
    assert report["checks"]["loss_equals_transformers"]["ok"]
