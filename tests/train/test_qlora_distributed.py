"""QLoRA on two CPU processes (torchrun, gloo): DDP trains a 4-bit base as one process with the same global batch
does; FSDP2 over a quantized base is refused before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.test_distributed import ENV, _config, _final, _losses, _run

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")
# plain SGD (as tests/train/test_distributed.py's LoRA case): Adam would turn the float-summation noise of lora_A's
# tiny first gradients (another order on two processes) into full-size steps of either sign
QLORA = {"strategy": {"name": "lora", "lora": {"dropout": 0.0, "quantize": "nf4"}},
         "train": {"optimizer": "sgd", "learning_rate": 0.05, "max_grad_norm": None}}


def test_qlora_under_ddp_equals_one_process(tmp_path, stories260k):
    _run(_config(tmp_path, stories260k, "one", 4, **QLORA), 1)
    _run(_config(tmp_path, stories260k, "two", 2, distributed={"strategy": "ddp"}, **QLORA), 2)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    a, b = _final(tmp_path / "one", "adapter_model.safetensors"), _final(tmp_path / "two", "adapter_model.safetensors")
    assert set(a) == set(b) and any("lora_B" in k for k in a)
    for k in a:
        if "lora_B" in k:  # zero at the start: every one was updated
            assert a[k].abs().max() > 1e-4, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_qlora_under_fsdp2_is_refused_before_anything_is_written(tmp_path, stories260k):
    cfg = _config(tmp_path, stories260k, "sharded", 2, distributed={"strategy": "fsdp2"}, **QLORA)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    assert "distributed.strategy is fsdp2" in proc.stderr and "distributed.strategy: ddp" in proc.stderr
    assert "Traceback" not in proc.stderr.split("tunelab: error")[-1]
    assert not (tmp_path / "sharded").exists()


def test_qlora_with_8bit_adamw_resumes_exactly_on_two_ddp_processes(tmp_path, stories260k):
    """Sharded checkpoints (torch.distributed.checkpoint) hold the trained parameters and bitsandbytes' 8-bit
    moments (rank 64 on q and o: 4096-value matrices, 8-bit states); the frozen 4-bit base comes from its files."""
    sections = {"strategy": {"name": "lora", "lora": {"quantize": "nf4", "dropout": 0.0, "rank": 64,
                                                       "target_modules": ["q_proj", "o_proj"]}},
                "distributed": {"strategy": "ddp"}}
    train = {"optimizer": "adamw_8bit", "save_every": 2}
    _run(_config(tmp_path, stories260k, "whole", 2, train=train, **sections), 2)
    cfg = _config(tmp_path, stories260k, "resumed", 2, train={**train, "stop_after": 2}, **sections)
    _run(cfg, 2)
    assert not (tmp_path / "resumed" / "final").exists()
    _run(cfg, 2, "--resume", "train.stop_after=null")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")
    a = _final(tmp_path / "whole", "adapter_model.safetensors")
    b = _final(tmp_path / "resumed", "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
