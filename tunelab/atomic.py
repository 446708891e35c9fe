"""Atomic writes: a file or a folder appears whole under its name, or not at all.

What is written goes to a temporary sibling named `.tmp-NAME-PID` and is then renamed onto NAME in one
`rename`, so a reader (a resumed run, a later run on the same data cache) never sees half of it. A write that
fails removes its temporary copy; one that a killed process left behind is removed by `remove_stale_temp`,
which the writers of a folder (checkpoints/, a run directory, the data cache) call before writing into it.
A replaced folder is first moved aside as `.old-NAME-PID`, so that a crash between the two renames leaves the
old version to restore, never neither.

Standard library only: every stage (data, strategies, train, plan) writes through it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import DiskFullError
from tunelab.processes import process_alive

log = logging.getLogger(__name__)
# what a writer leaves when its process dies mid-write: .tmp-NAME-PID (being written), .old-NAME-PID (the previous
# version of a folder, moved aside for a replace)
TEMP_NAME = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")
# writers that hide the errno (torch.save raises RuntimeError "[enforce fail at inline_container.cc]") leave the
# disk this nearly full when they fail for lack of space
NEARLY_FULL_BYTES = 16 * 2**20


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """Where this process writes `final` before renaming it (`kind` "old": where it moves the old version)."""
    return final.parent / f".{kind}-{final.name}-{os.getpid()}"


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_temp(final: Path, write: Callable[[Path], Any], make_dir: bool) -> Path:
    """`write(tmp)` into the temporary sibling of `final`, flushed to the disk; removed again if it fails."""
    tmp = temp_path(final)
    if tmp.exists():
        _remove(tmp)
    try:
        if make_dir:
            tmp.mkdir(parents=True)
        write(tmp)
        for f in (tmp.iterdir() if make_dir else [tmp]):
            if f.is_file():
                _fsync(f)
    except BaseException as exc:  # any failure (and Ctrl-C): no half-written copy stays behind
        full = isinstance(exc, Exception) and is_disk_full(exc, final.parent)
        _remove(tmp)
        if full:
            raise DiskFullError(f"the disk holding '{final.parent}' is full: writing '{final.name}' failed, and its "
                                "half-written copy was removed. Free space on that disk, or write to a larger one.",
                                final) from exc
        raise
    return tmp


def atomic_dir(final: Path, write: Callable[[Path], Any], replace: bool = True) -> Path:
    """Call `write(tmp_dir)`, then move the finished folder to `final` in one rename; returns `final`.

    If `write` fails, the temporary folder is removed; a failure for lack of space raises `DiskFullError`.
    An existing `final` is replaced, or with `replace=False` kept (another writer finished the same folder
    first: its copy is as good as this one, which is dropped).
    """
    final = Path(final)
    tmp = _write_temp(final, write, make_dir=True)
    if not replace:
        try:
            tmp.rename(final)
        except OSError:  # a folder of that name arrived first
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    elif final.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = temp_path(final, "old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(final.parent)
    return final


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write a file whole: readers see its old content or the new one, never a part."""
    path = Path(path)
    os.replace(_write_temp(path, lambda tmp: tmp.write_bytes(data), make_dir=False), path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temp(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that dead writers left in `folder`.

    The pid in a name tells whether its writer still runs: a live one's copy is left alone. An `.old-`
    folder whose replacement never arrived (its writer died between the two renames) is moved back.
    Returns the paths removed or restored.
    """
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        m = TEMP_NAME.match(path.name)
        if not m or (int(m.group(3)) != os.getpid() and process_alive(int(m.group(3)))):
            continue
        kind, name, pid = m.groups()
        if kind == "old" and not (folder / name).exists():
            path.rename(folder / name)
            log.info("restored %s from %s (its writer, pid %s, died while replacing it)", folder / name, path.name, pid)
        else:
            _remove(path)
            log.info("removed %s, left by a writer that is no longer running", path)
        done.append(path)
    return done
