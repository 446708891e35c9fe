"""Training in a child process (how `compare` trains each strategy): forked from a server that imported the training
code once, it trains as `tunelab train` does, in the parent's current environment, and a failure comes back as the
exit code and the error line `tunelab train` prints."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.runfiles import read_metrics
from tunelab.train.child import train_in_child
from tunelab.train.loop import train


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]


def test_a_child_trains_as_train_does_in_the_parents_environment(tmp_path, stories260k, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    tree = config_tree(stories260k, data, tmp_path / "child", train={"max_steps": 3})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    code, _ = train_in_child(tmp_path / "c.yaml", tmp_path / "c.log")
    assert code == 0 and (tmp_path / "child" / "final").is_dir()
    train(validate_config({**tree, "output_dir": str(tmp_path / "here")}))
    assert _losses(tmp_path / "child") == _losses(tmp_path / "here")

    # the environment as the parent has it at each run (the server started with the one before)
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path / "later-cache"))
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump({**tree, "output_dir": str(tmp_path / "child2")}))
    assert train_in_child(tmp_path / "c2.yaml", tmp_path / "c2.log")[0] == 0
    assert any((tmp_path / "later-cache").iterdir())


@pytest.mark.parametrize("fault", ["missing data", "crash"])
def test_a_failed_child_returns_its_code_and_error_line(tmp_path, stories260k, monkeypatch, fault):
    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    tree = config_tree(stories260k, data, tmp_path / "run")
    if fault == "missing data":
        tree["data"]["train"] = str(tmp_path / "nowhere.jsonl")
    else:  # not a TunelabError: the child prints its traceback and ends with 1
        monkeypatch.setenv("TUNELAB_DATA_CACHE", "/dev/null/cache")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    code, last = train_in_child(tmp_path / "c.yaml", tmp_path / "c.log")
    if fault == "missing data":
        assert code == 2 and last.startswith("tunelab: error:") and "nowhere.jsonl" in last
    else:
        assert code == 1 and "Traceback" in (tmp_path / "c.log").read_text() and "/dev/null/cache" in last
        monkeypatch.undo()
    # the server serves the next run all the same
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config_tree(stories260k, data, tmp_path / "ok")))
    assert train_in_child(tmp_path / "ok.yaml", tmp_path / "ok.log")[0] == 0


def test_a_childs_peak_memory_is_a_fresh_processs(tmp_path, stories260k):
    """The child touches the server's resident library pages, which a fork alone leaves out of its resident set
    (measured: 65 MB, 11% of this run's peak, before it did)."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    peaks = {}
    for how in ("child", "fresh"):
        tree = config_tree(stories260k, data, tmp_path / how, strategy={"name": "lora"}, train={"max_steps": 3})
        (tmp_path / f"{how}.yaml").write_text(yaml.safe_dump(tree))
        if how == "child":
            assert train_in_child(tmp_path / "child.yaml", tmp_path / "child.log")[0] == 0
        else:
            subprocess.run([sys.executable, "-m", "tunelab", "train", str(tmp_path / "fresh.yaml")], check=True,
                           capture_output=True)
        rows = read_metrics(tmp_path / how / "metrics.jsonl")
        peaks[how] = next(r for r in rows if r["type"] == "summary")["peak_memory_bytes"]
    assert abs(peaks["child"] - peaks["fresh"]) < 0.03 * peaks["fresh"], peaks
