"""Runtime faults lose no work: a NaN loss, a full disk, two runs on one output_dir.

Each fault stops with one paragraph and a clean exit code, keeps the newest good checkpoint, leaves
nothing that blocks --resume, and the resumed run gives the losses of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import load_config, validate_config
from tunelab.errors import ConfigError, NonFiniteError
from tunelab.train import loop
from tunelab.train.checkpoint import remove_stale_checkpoint_temp
from tunelab.runfiles import read_rows
from tunelab.train.runlock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_tunelab_logger():
    """cli.main sets up the 'tunelab' logger for a terminal; give the other tests theirs back."""
    logger = logging.getLogger("tunelab")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def write_config(tmp_path: Path, model: Path, name: str, out: Path | None = None, **train) -> tuple[Path, Path]:
    train_file = write_jsonl(tmp_path / "train.jsonl", VARIED_ROWS)
    out = out or tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_tree(model, train_file, out, train=train)))
    return path, out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`tunelab train ARGV` in this process: the exit code, stderr and stdout."""
    code = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_rows(run_dir / "metrics.jsonl") if r["type"] == "train"]  # as written: NaN a string


def error_paragraph(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("tunelab: error")]
    assert len(lines) == 1, stderr
    return lines[0]


def temp_folders(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob(".*") if p.name.startswith((".tmp-", ".old-"))]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_nan_loss_stops_at_once_and_a_resume_can_skip_past_it(tmp_path, stories260k, capsys):
    # learning_rate 100: step 1 is finite, step 2's gradient norm is NaN
    cfg, out = write_config(tmp_path, stories260k, "nan", max_steps=4, learning_rate=100, save_every=1)
    code, err, _ = run_cli(capsys, cfg)
    assert code == 1 and "Traceback" not in err
    msg = error_paragraph(err)
    assert "step 2:" in msg and "gradient norm nan" in msg and "no final/ was written" in msg
    assert str(out / "checkpoints" / "step-1") in msg
    assert all(key in msg for key in ("train.learning_rate (now 100)", "train.warmup_steps", "train.max_grad_norm"))
    assert not (out / "final").exists() and not temp_folders(out)
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]  # stopped at once
    assert rows[1]["grad_norm"] == "nan" and rows[1]["skipped"] is True
    good = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())

    # the checkpoint loads: resumed with skip, every later step is skipped and the run finishes (final/ is step 1's
    # finite weights), with the losses of a run that skipped from the start; its report renders the NaN rows
    skip = ["train.on_nonfinite=skip", "train.max_nonfinite_skips=10", "train.save_every=10"]
    code, err, stdout = run_cli(capsys, cfg, "--resume", *skip)
    assert code == 0 and "Traceback" not in err and "update was skipped" in err
    assert f"report: {out / 'report.html'}" in stdout
    whole_cfg, whole = write_config(tmp_path, stories260k, "whole", max_steps=4, learning_rate=100)
    loop.train(load_config(whole_cfg, skip))
    resumed_rows, whole_rows = train_rows(out), train_rows(whole)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in whole_rows]
    assert [r.get("skipped", False) for r in resumed_rows] == [False] + [True] * 3
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(final[k.removeprefix("lm.")], good[k]) for k in good)  # no update after step 1
    assert "non-finite loss or gradient norm at step(s) 2, 3, 4" in (out / "report.md").read_text()


def test_skip_leaves_a_transient_nan_step_out_and_keeps_the_schedule(tmp_path, stories260k, monkeypatch):
    train_file = write_jsonl(tmp_path / "train.jsonl", VARIED_ROWS)

    def run(name: str, **train):
        tree = config_tree(stories260k, train_file, tmp_path / name,
                           train={"max_steps": 4, "keep_checkpoints": 4, "warmup_steps": 2, **train})
        return loop.train(validate_config(tree))

    clean = run("clean")
    real_loss, calls = loop.causal_lm_loss, []

    def nan_at_step_3(model, batch, *args, **kwargs):  # one bad batch (grad_accum 1: one call per step)
        out = real_loss(model, batch, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(loop, "causal_lm_loss", nan_at_step_3)
    skipped = run("skipped", on_nonfinite="skip", max_nonfinite_skips=1, save_every=1)
    rows, clean_rows = train_rows(skipped.run_dir), train_rows(clean.run_dir)
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in clean_rows[:2]]
    assert rows[2]["loss"] == "nan" and rows[2]["skipped"] is True
    assert all(math.isfinite(r["loss"]) for r in rows[3:]) and "skipped" not in rows[3]
    assert [r["lr"] for r in rows] == [r["lr"] for r in clean_rows]  # the schedule advanced over the skipped step
    ckpt = skipped.run_dir / "checkpoints"
    before, after = (load_file(str(ckpt / f"step-{s}" / "trainable.safetensors")) for s in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at step 3
    adam = [torch.load(ckpt / f"step-{s}" / "state.pt", weights_only=True)["optimizer"]["state"][0]["step"]
            for s in (2, 3, 4)]
    assert [float(s) for s in adam] == [2.0, 2.0, 3.0]
    assert json.loads((ckpt / "step-3" / "trainer_state.json").read_text())["nonfinite_skips"] == 1
    assert skipped.final_dir is not None and (skipped.final_dir / "model.safetensors").is_file()


def test_weights_made_nan_by_the_last_update_are_never_written_as_final(tmp_path, stories260k, monkeypatch):
    real_update = loop.apply_update

    def poison_after_update(optimizer, scheduler, update=True):
        lr = real_update(optimizer, scheduler, update)
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return lr

    monkeypatch.setattr(loop, "apply_update", poison_after_update)
    train_file = write_jsonl(tmp_path / "train.jsonl", VARIED_ROWS)
    cfg = validate_config(config_tree(stories260k, train_file, tmp_path / "r", train={"max_steps": 1}))
    with pytest.raises(NonFiniteError, match="step 1: the update of this step made weights NaN or infinite"):
        loop.train(cfg)
    assert not (tmp_path / "r" / "final").exists() and not temp_folders(tmp_path / "r")
    assert not (tmp_path / "r" / LOCK_NAME).exists()  # released however the run ends


@pytest.fixture
def tmpfs(tmp_path):
    """A real, small tmpfs (root only); unmounted however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs, which needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_newest_checkpoint_and_resume_finishes(tmp_path, tmpfs, stories260k, capsys):
    # a checkpoint of stories260K is 3.2 MB: step-2 fits on 5 MB, step-4 beside it does not
    train = {"max_steps": 6, "save_every": 2, "keep_checkpoints": 1}
    whole_cfg, whole = write_config(tmp_path, stories260k, "whole", **train)
    loop.train(load_config(whole_cfg, ["train.save_every=10"]))  # saving changes no loss
    cfg, out = write_config(tmp_path, stories260k, "on-disk", out=tmpfs / "run", **train)
    code, err, _ = run_cli(capsys, cfg)
    assert code == 1 and "Traceback" not in err
    msg = error_paragraph(err)
    assert f"the disk holding output_dir '{out}' is full" in msg and "checkpoints/step-4" in msg
    assert f"'{out / 'checkpoints' / 'step-2'}', is intact" in msg and "--resume" in msg
    assert not temp_folders(out) and not (out / LOCK_NAME).exists()
    kept = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))  # complete and loadable
    assert len(kept) == len(load_file(str(whole / "final" / "model.safetensors")))
    del kept  # its tensors map the file: on a tmpfs, a mapped deleted file keeps its space
    assert torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=True)["optimizer"]["state"]

    # a killed writer's half-written folder takes 2 MB; with it, the 7 MB disk could not hold two checkpoints
    subprocess.run(["mount", "-o", "remount,size=7m", str(tmpfs)], check=True)
    dead = out / "checkpoints" / f".tmp-step-4-{dead_pid()}"
    dead.mkdir()
    (dead / "state.pt").write_bytes(b"\0" * 2 * 2**20)
    code, err, _ = run_cli(capsys, cfg, "--resume")
    assert code == 0 and "Traceback" not in err, err
    assert not dead.exists()
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train_rows(out)] == [r["loss"] for r in train_rows(whole)]
    final, reference = (load_file(str(d / "final" / "model.safetensors")) for d in (out, whole))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_stale_temp_folders_of_dead_writers_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    gone, alive = dead_pid(), os.getppid()
    for name in (f".tmp-step-4-{gone}", f".tmp-step-5-{alive}", ".tmp-step-6", ".tmp-notes", "step-2",
                 f".old-step-2-{gone}", f".old-step-3-{gone}"):
        (root / name).mkdir()
        (root / name / "f").write_text(name)
    removed = remove_stale_checkpoint_temp(root)
    left = sorted(p.name for p in root.iterdir())
    # a live writer's folder and folders of other names stay; step-3, moved aside by a writer that died before
    # its replacement arrived, is moved back; the rest is removed
    assert left == [".tmp-notes", f".tmp-step-5-{alive}", "step-2", "step-3"]
    assert (root / "step-2" / "f").read_text() == "step-2" and (root / "step-3" / "f").read_text().startswith(".old")
    assert len(removed) == 4


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, stories260k):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "earlier"}))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("tunelab.train.runlock").addHandler(handler)
    try:
        lock = RunLock(run)
    finally:
        logging.getLogger("tunelab.train.runlock").removeHandler(handler)
    assert any("took over the lock" in r and "no longer running" in r for r in records)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()

    with pytest.raises(ConfigError, match=rf"in use by another tunelab run \(pid {os.getpid()} on host "):
        RunLock(run)  # held (flock), even by another open in this same process
    train_file = write_jsonl(tmp_path / "train.jsonl", VARIED_ROWS)
    (run / "config.yaml").write_text("a finished run\n")
    cfg = validate_config(config_tree(stories260k, train_file, run, overwrite=True))
    with pytest.raises(ConfigError, match="in use by another tunelab run"):
        loop.train(cfg)  # --overwrite must not delete a live run
    assert (run / "config.yaml").read_text() == "a finished run\n"
    lock.release()
    assert not (run / LOCK_NAME).exists()

    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "since": "earlier"}))
    with pytest.raises(ConfigError, match="pid 1 on host another-host, since earlier"):
        RunLock(run)  # whether a process of another host runs cannot be told: never taken over


def test_two_train_processes_on_one_output_dir(tmp_path, stories260k):
    cfg, out = write_config(tmp_path, stories260k, "shared", max_steps=10)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # a core each
    procs = {}
    for seed in (1, 2):  # both start at once
        with (tmp_path / f"err-{seed}.txt").open("w") as err:
            procs[seed] = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), f"train.seed={seed}"],
                                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # whichever takes the lock first is paused while it holds it, so the runs overlap however the machine
        # schedules them; the other must then be refused
        deadline, winner = time.monotonic() + 120, None
        while winner is None:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "no run took the lock"
            try:
                pid = json.loads((out / LOCK_NAME).read_text())["pid"]
                winner = next(seed for seed, p in procs.items() if p.pid == pid)
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.01)
        procs[winner].send_signal(signal.SIGSTOP)
        loser = 3 - winner
        assert procs[loser].wait(timeout=120) == 2
        procs[winner].send_signal(signal.SIGCONT)
        assert procs[winner].wait(timeout=120) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    stderr = {seed: (tmp_path / f"err-{seed}.txt").read_text() for seed in procs}
    assert "Traceback" not in stderr[winner] and "Traceback" not in stderr[loser]
    msg = error_paragraph(stderr[loser])
    assert (f"output_dir '{out}' is in use by another tunelab run (pid {procs[winner].pid} on host "
            f"{socket.gethostname()}, since ") in msg
    # config, metrics and final/ are the winner's alone, and the lock is gone with it
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == winner
    assert [r["step"] for r in train_rows(out)] == list(range(1, 11))
    assert (out / "final" / "model.safetensors").is_file() and not (out / LOCK_NAME).exists()
