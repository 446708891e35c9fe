"""Metric sinks: one JSON object per line in a run's metrics file, flushed as it is written.

The writer only: what the file is called, how non-finite numbers are encoded and how rows are read back belong to
tunelab.runfiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_write_text
from tunelab.runfiles import encode_number


def _parse(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class MetricsWriter:
    """Appends rows to the metrics file. On resume, rows after the resumed step are dropped first (and a
    last line cut short by a crash or a full disk with them)."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True,
                 trackers: list[Any] | None = None):
        self.path = Path(path)
        self.enabled = enabled  # under torchrun only rank 0 writes
        self.trackers = trackers or []  # each gets every row (tunelab.train.trackers)
        self._file = None
        self._failed = False
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and (row := _parse(line)) is not None and row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps({k: encode_number(v) for k, v in row.items()}) + "\n")
                self._file.flush()
            except OSError:
                self._failed = True
                raise
            for tracker in self.trackers:
                tracker.log(row)

    def close(self) -> None:
        """Close the file. After a failed write (already raised), closing fails again on the same unwritten
        bytes: that second error is not raised, so that it does not hide the first."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                if not self._failed:
                    raise


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss is not used where VmHWM exists, because it carries over the parent's peak
    through fork and exec (a child of a large process would report the parent's memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
