"""`tunelab plan` runs no model unless it is handed a step timer (`tunelab plan --measure`)."""

from __future__ import annotations

import ast

import pytest
from pathlib import Path

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.plan.run import MEASURED, plan

PLAN_DIR = Path(__file__).resolve().parents[2] / "tunelab" / "plan"


def test_plan_imports_nothing_from_train():
    for path in PLAN_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith("tunelab.train")], (path.name, names)


def test_step_time_comes_from_the_injected_timer_only(tmp_path, stories260k):
    cfg = validate_config(config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run"))
    calls = []

    def timer(scfg, layers, examples, tokenizer):
        calls.append((scfg.strategy.name, layers, len(examples)))
        return 0.125

    timed = plan(cfg, "cpu", strategies=["full", "lora"], step_timer=timer).estimates
    assert sorted(calls) == [("full", 5, 24), ("lora", 5, 24)]  # stories260K has 5 decoder layers
    assert timed["full"].step_seconds == timed["lora"].step_seconds == 0.125
    assert timed["full"].time_source == MEASURED and timed["full"].seconds == 0.125 * 2  # train.max_steps: 2
    free = plan(cfg, "cpu", strategies=["full", "lora"]).estimates
    assert "FLOPs at" in free["full"].time_source and free["full"].step_seconds > 0
    assert free["lora"].memory_bytes == timed["lora"].memory_bytes  # timing changes no other figure


def test_the_runtime_measurement_is_kept_between_plans(tmp_path, monkeypatch):
    """The child process that measures the training stack's resident memory runs once per interpreter and versions;
    a damaged cache file is measured again, never trusted."""
    import subprocess

    from tunelab.plan import devices

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(devices, "_RUNTIME", {})
    first = devices.RuntimeProbe().bytes()
    assert first > devices.CPU_RUNNING_EXTRA_BYTES  # torch alone is far more than nothing
    path, key = devices._runtime_cache()
    assert path.is_file() and key in path.read_text()
    monkeypatch.setattr(devices, "_RUNTIME", {})
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    assert devices.RuntimeProbe().bytes() == first  # from the cache: no child process
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(devices, "_RUNTIME", {})
    path.write_text("{not json")
    assert devices.RuntimeProbe().bytes() > devices.CPU_RUNNING_EXTRA_BYTES and key in path.read_text()


def test_the_cpu_probe_takes_the_fastest_call_and_says_when_the_machine_was_busy():
    """The matmul-rate probe counts the fastest call (other work only slows a call down) and reports how much
    slower the median call was, on a clock that runs as the test says (no wall-clock time is measured)."""
    from tunelab.plan.devices import BUSY_LIMIT, _time_calls

    def probe(durations: list[float]):
        now = [0.0]
        calls = iter(durations)

        def clock() -> float:
            return now[0]

        def fn() -> None:
            now[0] += next(calls, durations[-1])

        return _time_calls(fn, seconds=1.0, clock=clock)

    idle = probe([0.01] * 3 + [0.01] * 200)
    assert idle.best == pytest.approx(0.01) and idle.busy == pytest.approx(1.0)
    # another job takes the CPU for most calls: the mean would read the rate 3x low; the fastest call does not
    busy = probe([0.01] * 3 + [0.03, 0.01, 0.03, 0.03, 0.03] * 40)
    assert busy.best == pytest.approx(0.01) and busy.busy == pytest.approx(3.0) and busy.busy >= BUSY_LIMIT
