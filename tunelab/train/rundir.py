"""The run directory: refuse to clobber another run, and check that a resumed run is the same run.

A run holds the directory's lock (`runlock.RunLock`) from `open_run_dir` to its end, so a second
writer is refused instead of mixing two runs in one folder."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import Config, dump_config
from tunelab.errors import ConfigError
from tunelab.atomic import remove_stale_temp
from tunelab.runfiles import CONFIG, RunFiles
from tunelab.train.checkpoint import remove_stale_checkpoint_temp
from tunelab.train.runlock import LOCK_NAME, RunLock

log = logging.getLogger(__name__)
DATA_CHECK_FILES = ("data-check.html", "data-check.md")
# keys that may change between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.log_every", "train.progress", "resume", "overwrite",
                     "plan.retention", "train.stop_after", "train.on_nonfinite", "train.max_nonfinite_skips"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config trees, ignoring the resumable ones."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def check_run_dir(cfg: Config) -> None:
    """Refuse an `output_dir` that this run must not write into; writes nothing."""
    run = Path(cfg.output_dir)
    saved = RunFiles(run).config
    if run.exists() and not run.is_dir():
        raise ConfigError(f"output_dir '{run}' is a file; choose a folder.")
    # `tunelab data check CONFIG` writes its report into output_dir before the run: that does not make it another run's
    contents = [p for p in run.iterdir() if p.name != LOCK_NAME and p.name not in DATA_CHECK_FILES] \
        if run.is_dir() else []
    if saved.is_file():
        if cfg.resume:
            old = yaml.safe_load(saved.read_text()) or {}
            changes = config_changes(old, cfg.model_dump(mode="json"))
            if changes:
                raise ConfigError(
                    f"output_dir '{run}' holds a run with a different config ({', '.join(changes)} changed), so it "
                    "cannot be resumed. Restore those keys, choose another output_dir, or pass --overwrite."
                )
        elif not cfg.overwrite:
            raise ConfigError(
                f"output_dir '{run}' already holds a run. Pass --resume to continue it, --overwrite to delete it "
                "and start again, or choose another output_dir."
            )
    elif contents:
        raise ConfigError(f"output_dir '{run}' is not empty and holds no tunelab run (no {CONFIG}); "
                          "tunelab will not write into it. Choose an empty or new folder.")


def open_run_dir(cfg: Config) -> tuple[Path, RunLock]:
    """Create `output_dir` and take its lock, check it again (another run may have written it since
    `check_run_dir`), clear it with overwrite, remove what dead writers left, write the resolved config.

    Returns the folder and the held lock; the caller releases the lock when the run ends."""
    run = Path(cfg.output_dir)
    saved = RunFiles(run).config
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run)
    try:
        check_run_dir(cfg)
        if cfg.overwrite and saved.is_file():
            log.info("overwrite: deleting the previous run in %s", run)
            for path in run.iterdir():  # all but the lock, which this run holds
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.name != LOCK_NAME:
                    path.unlink()
        remove_stale_temp(run)
        remove_stale_checkpoint_temp(RunFiles(run).checkpoints)
        saved.write_text(dump_config(cfg))
    except BaseException:
        lock.release()
        raise
    return run, lock


class RunLogHandler(logging.FileHandler):
    """train.log. Once a write fails (the disk is full), the file is given up instead of logging printing a
    traceback for every line: the terminal still shows every line, and the run reports the disk itself."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            self.failed = True
        else:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the same unwritten bytes as the failed write
            if not self.failed:
                raise
