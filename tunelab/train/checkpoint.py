"""Checkpoints: written atomically (`tunelab.atomic`: a temporary folder, then one rename), the last K kept.

A checkpoint holds what resuming needs and nothing the base model already has: the trainable
parameters (safetensors), the optimizer and scheduler states, the RNG states and the data position.
A write that fails removes its own half-written folder (a full disk is reported as `DiskFullError`),
and the folders a killed writer left behind are removed at start-up and before each save, so
neither blocks `--resume`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_dir, remove_stale_temp
from tunelab.runfiles import RunFiles

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
# save_sharded's temporary folder, written by every rank, carries no pid: .tmp-step-N
SHARDED_TEMP_DIR = re.compile(r"^\.tmp-step-\d+$")


def remove_stale_checkpoint_temp(root: Path) -> list[Path]:
    """Remove what dead writers left in checkpoints/: `remove_stale_temp`'s temporary folders, and the
    temporary folder of an interrupted sharded save (which no running writer holds once a run starts)."""
    done = remove_stale_temp(root)
    for path in sorted(Path(root).glob(".tmp-step-*")) if Path(root).is_dir() else []:
        if SHARDED_TEMP_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an interrupted sharded save", path)
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
    root = RunFiles(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_checkpoint_temp(root)

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
    root = RunFiles(run_dir).checkpoints
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
