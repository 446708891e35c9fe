"""One writer per run directory: the lock that keeps two `tunelab train` runs out of one output_dir.

Two runs writing the same output_dir would each exit 0 and leave config.yaml, metrics.jsonl and
final/ from different runs. The lock is the file `output_dir/.tunelab.lock`, held with
`fcntl.flock` for the whole run (the kernel drops a flock when its process dies, however it dies)
and holding the holder's pid, host and start time, so that a refused run can name it. A lock file
that nobody holds, written by a process of this host that is gone, is stale: it is taken over with
a log line. One written on another host is never taken over (whether that process runs cannot be
told from here). Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.processes import process_alive

log = logging.getLogger(__name__)
LOCK_NAME = ".tunelab.lock"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _flock(fd: int) -> bool:
    """Take the flock without waiting; a few quick retries ride out another run's momentary check."""
    for _ in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def _refusal(path: Path, holder: dict[str, Any]) -> ConfigError:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
           if holder else "a process that has not yet written its name")
    return ConfigError(f"output_dir '{path.parent}' is in use by another tunelab run ({who}; lock file '{path}'). "
                       "Wait for that run to finish or choose another output_dir; if that process is no longer "
                       "running, delete the lock file.")


def _decide(path: Path, fd: int, locked: bool) -> dict[str, Any]:
    """The previous holder's record if the lock may be taken (empty: nobody held it); else raise."""
    holder = _read_holder(fd)
    if not locked:
        for _ in range(10):  # the winner of a race writes its name just after taking the flock
            if holder:
                break
            time.sleep(0.05)
            holder = _read_holder(fd)
        raise _refusal(path, holder)
    if not holder:
        return holder
    pid = int(holder.get("pid", -1))
    if holder.get("host") != socket.gethostname():
        raise _refusal(path, holder)
    if pid != os.getpid() and process_alive(pid):  # a file system whose flock does not lock: trust the pid
        raise _refusal(path, holder)
    return holder


def check_unlocked(run_dir: Path) -> None:
    """Refuse (`ConfigError`, naming the holder) a run directory another live run holds; writes nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        _decide(path, fd, _flock(fd))
    finally:
        os.close(fd)  # drops the flock taken to look


class RunLock:
    """The held lock of one run directory; `release()` (or the end of a `with` block) gives it back."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = _decide(self.path, fd, _flock(fd))
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (deleted) it between our open and flock: take the new file
        self.fd: int | None = fd
        if previous:
            log.warning("took over the lock %s of pid %s (host %s, since %s), which is no longer running",
                        self.path, previous.get("pid"), previous.get("host"), previous.get("since"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Delete the lock file, then drop the flock (in that order: a waiting run then finds no file of ours)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
