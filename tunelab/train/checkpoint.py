"""Checkpoints: written atomically (a temporary folder, then one rename), the last K kept.

A checkpoint holds what resuming needs and nothing the base model already has: the trainable
parameters (safetensors), the optimizer and scheduler states, the RNG states and the data position.
A write that fails removes its own half-written folder (a full disk is reported as `DiskFullError`),
and the folders a killed writer left behind are removed at start-up and before each save, so
neither blocks `--resume`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import DiskFullError
from tunelab.processes import process_alive

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
# what atomic_dir leaves when its process dies mid-write: .tmp-NAME-PID (being written), .old-NAME-PID (the
# previous version, moved aside for a replace); save_sharded's .tmp-step-N carries no pid
TEMP_DIR = re.compile(r"^\.(tmp|old)-(step-\d+|final)-(\d+)$")
SHARDED_TEMP_DIR = re.compile(r"^\.tmp-step-\d+$")
# writers that hide the errno (torch.save raises RuntimeError "[enforce fail at inline_container.cc]") leave
# the disk this nearly full when they fail for lack of space
NEARLY_FULL_BYTES = 16 * 2**20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(final: Path, write: Any) -> Path:
    """Call `write(tmp_dir)`, then move the finished folder to `final` in one rename.

    If `write` fails, the temporary folder is removed; a failure for lack of space raises `DiskFullError`.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException as exc:  # any failure (and Ctrl-C): no half-written folder stays behind
        full = isinstance(exc, Exception) and is_disk_full(exc, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(f"the disk holding '{final.parent}' is full: writing '{final.name}' failed, and its "
                                "half-written copy was removed. Free space on that disk, or write to a larger one.",
                                final) from exc
        raise
    if final.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether a failed write failed because the disk (or the user's quota) is full.

    OSError says so by its errno and safetensors in its message; torch.save's RuntimeError says neither,
    so when the write went into `folder`, the disk also counts as full with less than `NEARLY_FULL_BYTES` left.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    if folder is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def remove_stale_temp(folder: Path) -> list[Path]:
    """Remove the temporary folders that dead writers left in `folder` (checkpoints/ or a run directory).

    The pid in a name tells whether its writer still runs: a live one's folder is left alone. A `.old-`
    folder whose replacement never arrived (its writer died between the two renames) is moved back.
    Returns the folders removed or restored.
    """
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        m = TEMP_DIR.match(path.name)
        if m and int(m.group(3)) != os.getpid() and process_alive(int(m.group(3))):
            continue
        if not m and not SHARDED_TEMP_DIR.match(path.name):
            continue
        target = folder / m.group(2) if m else None
        if m and m.group(1) == "old" and not target.exists():
            path.rename(target)
            log.info("restored %s from %s (its writer, pid %s, died while replacing it)", target, path.name, m.group(3))
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a writer that is no longer running", path)
        done.append(path)
    return done


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-N atomically and delete all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(root)

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        with (tmp / "state.pt").open("wb") as f:  # our own handle: closed, its space freed, even if the write fails
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state()}, f)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    path = atomic_dir(root / f"step-{step}", write)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def disk_full_message(path: Path | None, run_dir: Path) -> str:
    """The paragraph for a run stopped by a full disk: what failed, what was kept, how to go on."""
    run_dir = Path(run_dir)
    try:
        usage = shutil.disk_usage(run_dir)
        space = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:,.0f} MiB)"
    except OSError:
        space = ""
    done = list_checkpoints(run_dir)
    kept = (f"The newest complete checkpoint, '{done[-1]}', is intact" if done else
            "No checkpoint had been written yet (train.save_every keeps some)")
    return (f"the disk holding output_dir '{run_dir}' is full{space}: writing '{path or run_dir}' failed. {kept}, "
            "and no half-written folder was left behind. Free space on that disk (or move output_dir to a larger "
            "one), then run the same command with --resume" +
            (" to continue from that checkpoint." if done else ", which starts again from step 0."))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states; returns the trainer state (step, data position)."""
    params = dict(model.named_parameters())
    saved = load_file(str(path / "trainable.safetensors"))
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != trainable:
        raise ValueError(f"checkpoint '{path}' holds parameters {sorted(set(saved) ^ trainable)[:5]} that do not "
                         "match the model's trainable parameters; it belongs to a different strategy or model")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    blob = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text())
