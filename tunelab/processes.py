"""Whether a process still runs: how a folder or lock left by a writer tells a dead writer from a live one."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
