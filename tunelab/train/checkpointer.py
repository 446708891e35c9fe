"""The checkpointer of a session: saves and restores its training state (checkpoints/step-N) and writes its
final model (final/). One process's checkpoints or sharded ones is decided once, by `make_checkpointer`, as
torchtune's and torchtitan's checkpointer objects do; the recipe then only calls `latest`, `load`, `save` and
`save_final`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.runfiles import RunFiles
from tunelab.strategies.model import TrainModel
from tunelab.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.distributed import barrier, full_state_dict, load_consolidated, load_sharded, save_sharded
from tunelab.train.session import Session

FinalWriter = Callable[[TrainModel], Path]  # writes final/ from a whole (unsharded) model; returns the folder


class Checkpointer:
    """One process: the trainable weights, optimizer, schedule and RNG states in safetensors and torch files
    (train/checkpoint.py); final/ straight from the session's model."""

    def __init__(self, run_dir: Path, session: Session, keep: int) -> None:
        self.run_dir, self.session, self.keep = Path(run_dir), session, keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = list_checkpoints(self.run_dir)
        return done[-1] if done else None

    def load(self, path: Path) -> dict[str, Any]:
        """Restore the session's model, optimizer, schedule and RNG from `path`; returns its trainer state."""
        s = self.session
        return load_checkpoint(path, s.model, s.optimizer, s.scheduler)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """checkpoints/step-`step` (with the trainer `state`), keeping the newest `keep`."""
        s = self.session
        return save_checkpoint(self.run_dir, step, s.model, s.optimizer, s.scheduler, state, self.keep)

    def save_final(self, write: FinalWriter) -> Path:
        return write(self.session.train_model)


class ShardedCheckpointer(Checkpointer):
    """Under torchrun: every rank saves and loads its own shard (torch.distributed.checkpoint); final/ is the
    whole model, gathered and written by rank 0 into a fresh unsharded copy (`unsharded()`)."""

    def __init__(self, run_dir: Path, session: Session, keep: int, unsharded: Callable[[], TrainModel]) -> None:
        super().__init__(run_dir, session, keep)
        self.unsharded = unsharded

    def load(self, path: Path) -> dict[str, Any]:
        s = self.session
        return load_sharded(path, s.model, s.optimizer, s.scheduler, s.info)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        s = self.session
        return save_sharded(RunFiles(self.run_dir).checkpoints / f"step-{step}", s.model, s.optimizer, s.scheduler, state,
                            s.info, self.keep)

    def save_final(self, write: FinalWriter) -> Path:
        full = full_state_dict(self.session.model)  # a collective: every rank takes part
        if self.session.info.is_main:
            single = self.unsharded()
            load_consolidated(single, full)
            write(single)
        barrier()
        return RunFiles(self.run_dir).final


def make_checkpointer(run_dir: Path, session: Session, keep: int,
                      unsharded: Callable[[], TrainModel]) -> Checkpointer:
    """The session's checkpointer: sharded under torchrun (`unsharded` makes the whole model final/ is written
    from), else one process's."""
    if session.info.enabled:
        return ShardedCheckpointer(run_dir, session, keep, unsharded)
    return Checkpointer(run_dir, session, keep)
