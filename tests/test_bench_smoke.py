"""The benchmark's smoke mode runs every system on the CPU, so that bench/ cannot rot (no timing claims)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_runs_every_system(tmp_path):
    pytest.importorskip("trl", reason="the bench extra (pip install -e .[bench]) is not installed")
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_throughput.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tunelab", "hf_trainer", "trl", "trl_packed"}
    for name, r in results.items():
        assert r["tokens"] > 0 and r["seconds"] > 0 and r["steps"] == 2, name
    # every system consumed about the same number of real tokens per step
    per_step = [r["tokens"] / r["steps"] for r in results.values()]
    assert max(per_step) < 1.6 * min(per_step)
    assert "smoke mode" in proc.stdout
