"""torchrun on the CPU (gloo), two processes: FSDP2 and DDP equal one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.train.metrics import read_metrics

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _config(tmp_path, stories260k, name, batch_size, **sections):
    train = {"max_steps": 4, "batch_size": batch_size, "learning_rate": 1e-2, **sections.pop("train", {})}
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / name,
                       train=train, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(cfg: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tunelab", "train", str(cfg), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tunelab", "train", str(cfg), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _final(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / name))


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, stories260k, strategy):
    _run(_config(tmp_path, stories260k, "one", 4), 1)
    _run(_config(tmp_path, stories260k, "two", 2, distributed={"strategy": strategy}), 2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    w1, w2 = _final(one), _final(two)
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # the consolidated final/ loads in plain transformers, in one process, with those weights' logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 403, 407, 261, 378]])
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(two / "final")(ids).logits,
                               AutoModelForCausalLM.from_pretrained(one / "final")(ids).logits, rtol=1e-4, atol=1e-4)
    assert not (two / "train-rank1.log").read_text().count("INFO")  # only rank 0 logs progress


def test_lora_under_fsdp2(tmp_path, stories260k):
    lora = {"strategy": {"name": "lora", "lora": {"dropout": 0.0}}}
    _run(_config(tmp_path, stories260k, "one", 4, **lora), 1)
    _run(_config(tmp_path, stories260k, "two", 2, **lora), 2)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    a, b = _final(tmp_path / "one", "adapter_model.safetensors"), _final(tmp_path / "two", "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_on_two_processes(tmp_path, stories260k):
    _run(_config(tmp_path, stories260k, "whole", 2, train={"save_every": 2}), 2)
    cfg = _config(tmp_path, stories260k, "resumed", 2, train={"save_every": 2, "stop_after": 2})
    _run(cfg, 2)
    assert not (tmp_path / "resumed" / "final").exists()
    assert {"rng-0.pt", "rng-1.pt", ".metadata"} <= {p.name for p in (tmp_path / "resumed" / "checkpoints" / "step-2").iterdir()}
    _run(cfg, 2, "--resume", "train.stop_after=null")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")
    for k, w in _final(tmp_path / "whole").items():
        assert torch.equal(_final(tmp_path / "resumed")[k], w), k


def test_more_processes_than_work_is_refused(tmp_path, stories260k):
    cfg = _config(tmp_path, stories260k, "tiny", 8)
    tree = yaml.safe_load(cfg.read_text())
    write_jsonl(Path(tree["data"]["train"]), VARIED_ROWS[:10])
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    assert "not enough work" in proc.stderr and "(rank 0)" in proc.stderr
    assert "Traceback" not in proc.stderr.split("tunelab: error")[-1]


def _rank_pid(rank: int, marker: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in cmd and b"tunelab" in cmd:
            return int(pid)
    return None


def test_a_rank_that_dies_ends_the_job_naming_it(tmp_path, stories260k):
    cfg = _config(tmp_path, stories260k, "dies", 2, train={"max_steps": 100000})
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "dies" / "metrics.jsonl").is_file():
        time.sleep(0.5)
    time.sleep(2)
    pid = _rank_pid(1, str(cfg))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "tunelab: error: rank 1 failed (SIGKILL)" in err
