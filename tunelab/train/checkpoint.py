"""Checkpoints: written atomically (a temporary folder, then one rename), the last K kept.

A checkpoint holds what resuming needs and nothing the base model already has: the trainable
parameters (safetensors), the optimizer and scheduler states, the RNG states and the data position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(final: Path, write: Any) -> Path:
    """Call `write(tmp_dir)`, then move the finished folder to `final` in one rename."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    return final


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

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    path = atomic_dir(root / f"step-{step}", write)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return path


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
