"""The run directory: refuse to clobber another run, and check that a resumed run is the same run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import Config, dump_config
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)
# keys that may change between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.log_every", "train.progress", "resume", "overwrite",
                     "plan.retention", "train.stop_after"}


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
    saved = run / "config.yaml"
    if run.exists() and not run.is_dir():
        raise ConfigError(f"output_dir '{run}' is a file; choose a folder.")
    contents = list(run.iterdir()) if run.is_dir() else []
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
        raise ConfigError(f"output_dir '{run}' is not empty and holds no tunelab run (no config.yaml); "
                          "tunelab will not write into it. Choose an empty or new folder.")


def open_run_dir(cfg: Config) -> Path:
    """Create (or, with overwrite, recreate) `output_dir` after `check_run_dir`; write the resolved config."""
    run = Path(cfg.output_dir)
    saved = run / "config.yaml"
    if cfg.overwrite and saved.is_file():
        log.info("overwrite: deleting the previous run in %s", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    saved.write_text(dump_config(cfg))
    return run
