"""torchrun on the CPU (gloo), two processes: FSDP2 and DDP equal one process with the same global batch.

Every comparison checks each parameter's step-1 gradient (as the update uses it: after clipping) and the
reported gradient norm, after an eval at step 0 (a forward without backward, which leaves FSDP2's root
gathered); and plain SGD runs a few steps, since Adam's per-parameter normalisation hides a wrong gradient
scale in the weights."""

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
from tunelab.runfiles import read_metrics

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # for tests.train.step1_grads


def _config(tmp_path, stories260k, name, batch_size, **sections):
    # an eval at steps 0, 2 and 4, from its own file (the training data stay all 24 rows)
    train = {"max_steps": 4, "batch_size": batch_size, "learning_rate": 1e-2, "eval_every": 2,
             **sections.pop("train", {})}
    sections["data"] = {"eval": str(write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[::4])), **sections.get("data", {})}
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / name,
                       train=train, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(cfg: Path, nproc: int, *extra: str, step1_grads: bool = False) -> subprocess.CompletedProcess:
    """`tunelab train CFG` on `nproc` processes; with `step1_grads`, through the test hook that saves the step-1
    gradients beside the run directory (read them with `_step1_grads`)."""
    module = "tests.train.step1_grads" if step1_grads else "tunelab"
    env = {**ENV, "TUNELAB_TEST_STEP1_GRADS": str(cfg.with_suffix(".step1-grads.pt"))} if step1_grads else ENV
    cmd = [sys.executable, "-m", module, "train", str(cfg), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, "train", str(cfg), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _step1_grads(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir.with_suffix(".step1-grads.pt"), weights_only=True)


def assert_same_gradients(two: Path, one: Path) -> None:
    """The step-1 gradient of every parameter (to 3e-5 of its largest entry: float32 sums in another order
    differ by 5e-6), and the reported gradient norm of every step, agree."""
    g1, g2 = _step1_grads(one), _step1_grads(two)
    assert set(g2) == set(g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=3e-5 * float(g1[k].abs().max()), msg=k)
    torch.testing.assert_close(_losses(two, "grad_norm"), _losses(one, "grad_norm"), rtol=1e-5, atol=0)


def _final(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / name))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, stories260k) -> Path:
    """The reference: one process with the global batch of 4 (shared by the FSDP2 and DDP comparisons)."""
    tmp = tmp_path_factory.mktemp("one")
    _run(_config(tmp, stories260k, "one", 4), 1, step1_grads=True)
    return tmp / "one"


@pytest.fixture(scope="module")
def fsdp2_two(tmp_path_factory, stories260k) -> Path:
    """Two FSDP2 processes of 2 rows each, checkpointing every 2 steps: compared with one process, and the
    uninterrupted run that a resumed two-process run must equal (save_every changes no loss)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    proc = _run(_config(tmp, stories260k, "two", 2, distributed={"strategy": "fsdp2"}, train={"save_every": 2},
                        data={"cache_dir": str(tmp / "cache")}), 2, step1_grads=True)
    # rank 0 encodes the train and eval files into the cache; rank 1 waits for it and reads the same tables
    assert proc.stderr.count("(cached for the next run") == 2 and proc.stderr.count("(cache hit)") == 2
    assert len([p for p in (tmp / "cache").iterdir() if (p / "meta.json").is_file()]) == 2
    return tmp / "two"


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, stories260k, one_process, fsdp2_two, strategy):
    one, two = one_process, fsdp2_two
    if strategy == "ddp":
        _run(_config(tmp_path, stories260k, "two", 2, distributed={"strategy": strategy}), 2, step1_grads=True)
        two = tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert_same_gradients(two, one)
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


def test_sgd_on_two_fsdp2_processes_accumulating_equals_one_batch(tmp_path, stories260k):
    """Plain SGD without clipping: the update is the gradient times the learning rate, so a gradient of a
    wrong scale (on any parameter: the root's tied embedding and final norm, or a decoder layer's) moves the
    weights by a wrong amount."""
    sgd = {"optimizer": "sgd", "learning_rate": 0.05, "max_grad_norm": None}
    one = _config(tmp_path, stories260k, "one", 4, train=sgd)
    two = _config(tmp_path, stories260k, "two", 1, train={**sgd, "grad_accum": 2}, distributed={"strategy": "fsdp2"})
    _run(one, 1, step1_grads=True)
    _run(two, 2, step1_grads=True)
    one, two = tmp_path / "one", tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert_same_gradients(two, one)
    w1, w2, base = _final(one), _final(two), load_file(str(stories260k / "model.safetensors"))
    for k in w1:  # the updates of 4 steps: every parameter moved by at least 7e-3; they agree to 3e-7
        assert (w1[k] - base[k]).abs().max() > 1e-3, k
        torch.testing.assert_close(w2[k] - base[k], w1[k] - base[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lora_under_fsdp2(tmp_path, stories260k):
    """Plain SGD, as above: lora_B starts at zero, so lora_A's first gradients are tiny, and Adam would turn their
    float-summation noise (another order on two processes) into full-size steps of either sign."""
    lora = {"strategy": {"name": "lora", "lora": {"dropout": 0.0}},
            "train": {"optimizer": "sgd", "learning_rate": 0.05, "max_grad_norm": None}}
    _run(_config(tmp_path, stories260k, "one", 4, **lora), 1)
    _run(_config(tmp_path, stories260k, "two", 2, distributed={"strategy": "fsdp2"}, **lora), 2)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    a, b = _final(tmp_path / "one", "adapter_model.safetensors"), _final(tmp_path / "two", "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        if "lora_B" in k:  # zero at the start: every one was updated
            assert a[k].abs().max() > 1e-4, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_resume_on_two_processes(tmp_path, stories260k, fsdp2_two):
    whole = fsdp2_two
    cfg = _config(tmp_path, stories260k, "resumed", 2, train={"save_every": 2, "stop_after": 2})
    _run(cfg, 2)
    assert not (tmp_path / "resumed" / "final").exists()
    assert {"rng-0.pt", "rng-1.pt", ".metadata"} <= {p.name for p in (tmp_path / "resumed" / "checkpoints" / "step-2").iterdir()}
    _run(cfg, 2, "--resume", "train.stop_after=null")
    assert _losses(tmp_path / "resumed") == _losses(whole)
    for k, w in _final(whole).items():
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


def test_samples_during_training_are_refused_before_anything_is_written(tmp_path, stories260k):
    cfg = _config(tmp_path, stories260k, "sampled", 2, train={"sample_every": 2})
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    assert "train.sample_every generates on one process" in proc.stderr
    assert "Traceback" not in proc.stderr.split("tunelab: error")[-1]
    assert not (tmp_path / "sampled").exists()  # refused before the model loaded and the run dir was opened


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
