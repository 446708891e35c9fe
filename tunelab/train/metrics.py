"""Metric sinks: one JSON object per line in metrics.jsonl, flushed as it is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Appends rows to metrics.jsonl. On resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # under torchrun only rank 0 writes
        self._file = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
