"""Result files a command writes (`--output`, `--predictions`, `--fix`): checked before the work starts.

An evaluation or an audit can run for minutes; a path it cannot write at the end would lose the
results. So each path is checked first: its folder is created, and a path that is a folder, or
whose folder cannot be created or written, is refused with a `ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import ConfigError

OUTPUT_FLAGS = ("output", "predictions", "fix")  # argparse destinations of the flags that name a result file


def prepare_output_file(path: str, flag: str) -> Path:
    """Make sure a file can be written at `path` (creating its parent folders); `flag` names it in errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} '{path}' is a folder; it must name a file, e.g. {flag} {p / 'results.json'}.")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only disk
        raise ConfigError(f"{flag} '{path}': cannot create its folder '{parent}' ({exc.strerror or exc}). "
                          "Choose another path.") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} '{path}' cannot be written (no write permission in '{parent}'). "
                          "Choose another path.")
    return p
