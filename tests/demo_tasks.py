"""The full demo's three tasks, each in its own test file (tests/test_demo_task_*.py) so that `make test`'s two
workers run them side by side (--dist loadfile keeps a file on one worker); each runs at the demo's own budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.demo import demo_budget
from tunelab.demo_world.data import write_demo_data


def demo_inputs(out: Path) -> tuple[dict[str, Path], Path, int, int]:
    """(the demo's data files, its output folder, steps, held-out examples) as `tunelab demo` sets them."""
    steps, max_eval = demo_budget(quick=False, steps=None)
    return write_demo_data(out / "data", n_train=400, n_eval=100), out, steps, max_eval


def by_strategy(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["strategy"]: r for r in result["table"]}
