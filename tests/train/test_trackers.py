"""train.report_to: every metrics.jsonl row reaches the tracker, read back with the tracker's own reader
(TensorBoard's EventAccumulator, W&B's `wandb leet inspect` of the offline run files, MLflow's client, trackio's
SQLite store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.train.loop import train
from tunelab.runfiles import read_metrics, read_rows


def _tree(tmp_path, stories260k, name, **train_section):
    return config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / name,
                       data={"eval": str(write_jsonl(tmp_path / "e.jsonl", VARIED_ROWS[:4]))},
                       train={"max_steps": 4, "eval_every": 2, "report_to": ["tensorboard"], **train_section})


def _scalars(run_dir, tag):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def test_tensorboard_holds_every_row_and_the_config(tmp_path, stories260k):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = validate_config(_tree(tmp_path, stories260k, "run", sample_every=2, num_samples=2, sample_tokens=4))
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses, acc = _scalars(tmp_path / "run", "train/loss")
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["type"] == "train"]
    evals, _ = _scalars(tmp_path / "run", "eval/eval_loss")
    assert evals == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in rows if r["type"] == "eval"]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert "summary/peak_memory_bytes" in acc.Tags()["scalars"]
    tensors = acc.Tags()["tensors"]  # add_text stores text as tensors: the config, and the samples at each step
    assert any(t.startswith("config") for t in tensors)
    sample_tag = next(t for t in tensors if t.startswith("samples"))
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(sample_tag)}
    first = read_rows(tmp_path / "run" / "samples.jsonl")[0]
    assert sorted(texts) == [0, 2, 4] and first["reference"] in texts[0] and "| prediction |" in texts[0]


def test_a_resumed_run_logs_each_step_once(tmp_path, stories260k):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    tree = _tree(tmp_path, stories260k, "run", save_every=2, stop_after=3)  # step 3 is logged, then lost
    train(validate_config(tree))
    tree["train"]["stop_after"] = None
    tree["resume"] = True
    train(validate_config(tree))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses, _ = _scalars(tmp_path / "run", "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["type"] == "train"]


@pytest.mark.parametrize("tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                             ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_a_missing_tracker_library_is_a_clear_error(tmp_path, stories260k, capsys, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if the library were not installed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tmp_path, stories260k, "run", report_to=[tracker])))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'tunelab[{tracker}]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def _error_paragraph(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("tunelab: error")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_an_mlflow_uri_of_the_retired_file_store_is_refused_before_anything_is_written(tmp_path, stories260k, capsys,
                                                                                     monkeypatch):
    """MLflow 3 refuses its file store (`file:./mlruns`, a plain path) unless MLFLOW_ALLOW_FILE_STORE opts back in:
    the run stops with one paragraph and exit 2, before its output_dir exists."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    with pytest.raises(MlflowException):  # the reference: MLflow's own client refuses this store
        MlflowClient(tracking_uri="file:./mlruns")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tmp_path, stories260k, "run", report_to=["tensorboard", "mlflow"])))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    msg = _error_paragraph(err)
    assert "Traceback" not in err
    assert "MLFLOW_TRACKING_URI='file:./mlruns'" in msg and "sqlite:///" in msg and "train.report_to" in msg
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()


def test_wandb_online_without_a_login_is_refused_before_anything_is_written(tmp_path, stories260k):
    """WANDB_MODE=online with no API key anywhere (no WANDB_API_KEY, an empty home: no .netrc, no settings): one
    paragraph and exit 2 before the output_dir exists, without a prompt and without the network (W&B's server is
    an address where nothing listens: a request would fail with a connection error, not this message)."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tmp_path, stories260k, "run", report_to=["wandb"])))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    env.update({"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "WANDB_MODE": "online",
                "WANDB_BASE_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = _error_paragraph(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "WANDB_MODE=online" in msg and "wandb login" in msg and "WANDB_MODE=offline" in msg
    assert not (tmp_path / "run").exists() and not (tmp_path / "wandb").exists()


def _wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's offline .wandb files (one per attempt), through W&B's own reader."""
    records = []
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                             capture_output=True, text=True, check=True).stdout
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return client, run


def _trackio_logs(store: Path, run_name: str) -> tuple[list[dict], dict]:
    """trackio fixes its store's folder at import (TRACKIO_DIR): read it in a process of its own."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps([S.get_logs('tunelab', {run_name!r}), S.get_run_config('tunelab', {run_name!r})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRACKIO_DIR": str(store)}).stdout
    logs, config = json.loads(out.splitlines()[-1])
    return logs, config


TRAIN_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "num_label_tokens")


def _pairs(rows, kind, field):
    return [(r["step"], pytest.approx(r[field], rel=1e-6)) for r in rows if r["type"] == kind and field in r]


def test_wandb_mlflow_and_trackio_hold_every_row_the_config_and_the_samples(tmp_path, stories260k):
    """One run with all four trackers (trackio's store is fixed at import, so the run is a process of its own)."""
    for module in ("tensorboard", "wandb", "mlflow", "trackio"):
        pytest.importorskip(module, reason=f"the {module} extra is not installed")
    tree = _tree(tmp_path, stories260k, "run", sample_every=2, num_samples=2, sample_tokens=4,
                 report_to=["tensorboard", "wandb", "mlflow", "trackio"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "TRACKIO_PROJECT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir / "metrics.jsonl")
    samples = read_rows(run_dir / "samples.jsonl")
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow", "trackio"}

    # W&B: the offline run holds every row at its step, the resolved config, the summary and the sample tables
    records = _wandb_records(run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    for field in TRAIN_FIELDS:
        assert [(h["step"], h[f"train/{field}"]) for h in history if f"train/{field}" in h] == \
            _pairs(rows, "train", field), field
    assert [(h["step"], h["eval/eval_loss"]) for h in history if "eval/eval_loss" in h] == \
        _pairs(rows, "eval", "eval_loss")
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["run_id"] == ids["wandb"] and run_record["project"] == "tunelab"
    assert run_record["config"]["update"]["train"]["max_steps"] == 4
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    peak = next(r["peak_memory_bytes"] for r in rows if r["type"] == "summary")
    assert summary["summary/peak_memory_bytes"] == peak
    tables = {h["step"]: h["samples.path"] for h in history if h.get("samples._type") == "table-file"}
    assert sorted(tables) == [0, 2, 4]
    (files,) = run_dir.glob("wandb/offline-run-*/files")
    table = json.loads((files / tables[4]).read_text())
    assert table["columns"] == list(samples[0])
    assert [dict(zip(table["columns"], r)) for r in table["data"]] == [s for s in samples if s["step"] == 4]

    # MLflow: the run's metric history, its params (the flattened config), the sample tables, and its status
    client, run = _mlflow_run(run_dir)
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED" and run.info.run_name == "run"
    for field in TRAIN_FIELDS:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/{field}")] == \
            _pairs(rows, "train", field), field
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/eval_loss")] == \
        _pairs(rows, "eval", "eval_loss")
    assert run.data.metrics["summary/peak_memory_bytes"] == peak
    assert run.data.params["train.max_steps"] == "4" and run.data.params["strategy.name"] == "full"
    tables = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    assert tables == ["samples/step_000000.json", "samples/step_000002.json", "samples/step_000004.json"]

    # trackio: its local store, read by its own storage class
    logs, config = _trackio_logs(tmp_path / "trackio", ids["trackio"])
    for field in TRAIN_FIELDS:
        assert [(e["step"], e[f"train/{field}"]) for e in logs if f"train/{field}" in e] == \
            _pairs(rows, "train", field), field
    assert [(e["step"], e["eval/eval_loss"]) for e in logs if "eval/eval_loss" in e] == \
        _pairs(rows, "eval", "eval_loss")
    assert sorted(e["step"] for e in logs if "samples" in e) == [0, 2, 4]
    assert config["train"]["max_steps"] == 4
    assert [e["summary/peak_memory_bytes"] for e in logs if "summary/peak_memory_bytes" in e] == [peak]


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_run(tmp_path, stories260k):
    for module in ("wandb", "mlflow"):
        pytest.importorskip(module, reason=f"the {module} extra is not installed")
    tree = _tree(tmp_path, stories260k, "run", save_every=2, stop_after=3, report_to=["wandb", "mlflow"])
    train(validate_config(tree))  # steps 1-3 reach the trackers; stop_after saves step 3
    run_dir = tmp_path / "run"
    client, run = _mlflow_run(run_dir)
    assert run.info.status == "KILLED"  # stopped before the end: not finished
    tree["train"]["stop_after"] = None
    tree["resume"] = True
    train(validate_config(tree))
    rows = read_metrics(run_dir / "metrics.jsonl")
    want = _pairs(rows, "train", "loss")
    client, run = _mlflow_run(run_dir)  # one run, continued
    assert run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == want and [s for s, _ in history] == [1, 2, 3, 4]
    records = _wandb_records(run_dir)
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {run_dir_id(run_dir, "wandb")}
    steps = [r["history"]["item"] for r in records if r["type"] == "history"]
    losses = [(h["step"], h["train/loss"]) for h in steps if "train/loss" in h]
    assert losses == want


def run_dir_id(run_dir: Path, tracker: str) -> str:
    return json.loads((run_dir / "trackers.json").read_text())[tracker]


@pytest.mark.parametrize("strategy", ["full", "soft_prompt"])
def test_sample_predictions_during_training(tmp_path, stories260k, strategy):
    """samples.jsonl: the same held-out prompts at step 0, every sample_every steps and at the end, each prediction
    what greedy generation from the model of that step gives (checked at the end against the final model)."""
    from tunelab.evaluate.generate import generate
    from tunelab.evaluate.loaders import load_for_eval

    tree = _tree(tmp_path, stories260k, "run", sample_every=2, num_samples=3, sample_tokens=6, report_to=[])
    tree["strategy"] = {"name": strategy}
    cfg = validate_config(tree)
    train(cfg)
    rows = read_rows(tmp_path / "run" / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in rows] == [(s, i) for s in (0, 2, 4) for i in range(3)]
    evals = VARIED_ROWS[:4]
    for r in rows:
        assert r["prompt"] == evals[r["index"]]["prompt"] and r["reference"] == evals[r["index"]]["completion"].strip()
    em = load_for_eval(cfg.output_dir)
    final = generate(em, [evals[i]["prompt"] for i in range(3)], 6)
    assert [r["prediction"] for r in rows if r["step"] == 4] == [g.text.strip() for g in final]
    base = generate(load_for_eval(str(stories260k)), [evals[0]["prompt"]], 6)[0].text.strip()
    from tunelab.report.run_report import report_run

    html = report_run(tmp_path / "run").read_text()  # the report shows them side by side, step by step
    assert "Sample predictions" in html and "step 0" in html and "step 4" in html
    if strategy == "full":  # step 0 is the untrained model (a soft prompt starts with its initial virtual tokens)
        assert rows[0]["prediction"] == base


def test_a_prompting_run_reaches_the_trackers_too(tmp_path, stories260k):
    """Tuning-free prompting trains nothing, but its eval figures are tracked like any run's."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    tree = _tree(tmp_path, stories260k, "run", report_to=["mlflow"])
    tree["strategy"] = {"name": "prompting"}
    train(validate_config(tree))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    client, run = _mlflow_run(tmp_path / "run")
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/eval_loss")] == \
        _pairs(rows, "eval", "eval_loss")
    assert run.data.metrics["params/trainable_params"] == 0
