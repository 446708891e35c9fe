"""Experiment trackers that receive every metrics.jsonl row, through the tracker's own library.

metrics.jsonl and the HTML report are always written; `train.report_to` adds trackers, each in its offline or
local mode where it has one. Every tracker gets each numeric field of each row as `<row type>/<field>` at the
row's step, the resolved config (as text, config or params), the final summary row, and the training-time sample
predictions as a table.

- tensorboard: event files in RUN_DIR/tensorboard (torch.utils.tensorboard's SummaryWriter). A resumed run purges
  the events after its resumed step, as metrics.jsonl drops its rows.
- wandb: `wandb.init` in RUN_DIR (mode from WANDB_MODE, default offline: RUN_DIR/wandb/offline-run-*, uploaded
  later with `wandb sync`; project from WANDB_PROJECT, default tunelab). The step axis is the metric `step`.
- mlflow: a run in MLFLOW_TRACKING_URI, or by default the SQLite store RUN_DIR/mlflow/mlflow.db (artifacts beside
  it; `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db` shows it); experiment from
  MLFLOW_EXPERIMENT_NAME, default tunelab. The config is logged as flattened params.
- trackio: trackio's local store (TRACKIO_DIR, default under the Hugging Face cache; `trackio show`), project
  from TRACKIO_PROJECT, default tunelab.

A resumed run continues the same W&B, MLflow and trackio run (their ids are kept in RUN_DIR/trackers.json); those
trackers keep what they already received, so the steps between the last checkpoint and an interruption appear
twice there, once from each attempt.

A tracker that cannot start (its library missing, an MLflow store MLflow refuses, W&B online without a login) is
refused by `check_trackers` before the run writes anything, in one paragraph."""

from __future__ import annotations

import importlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import yaml

from tunelab.atomic import atomic_write_text
from tunelab.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # each is also the name of the pip extra that installs it
PROJECT = "tunelab"  # the W&B project, MLflow experiment and trackio project unless the tracker's env var says
OFFLINE_WANDB_MODES = ("offline", "dryrun", "disabled")  # WANDB_MODE values that need no W&B login


def _library(tracker: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"train.report_to names {tracker}, whose library is not installed: "
                          f"pip install 'tunelab[{tracker}]' (or remove it from train.report_to).") from None


def _one_line(exc: BaseException) -> str:
    """A library's error message as one sentence of a paragraph."""
    text = " ".join(str(exc).split())
    return text if text.endswith((".", "!", "?")) else text + "."


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, named `<row type>/<field>` (the step is the axis, not a value)."""
    kind = row.get("type", "row")
    return {f"{kind}/{key}": value for key, value in row.items()
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as `section.key` -> text, for trackers whose params are flat strings (MLflow)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class _RunIds:
    """RUN_DIR/trackers.json: each tracker's run id, so that a resumed run continues the same tracker run."""

    def __init__(self, run_dir: Path, resuming: bool) -> None:
        self.path = run_dir / "trackers.json"
        self.ids: dict[str, str] = {}
        if resuming and self.path.is_file():
            try:
                self.ids = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.ids = {}  # damaged: the resumed run starts new tracker runs

    def get(self, tracker: str) -> str | None:
        return self.ids.get(tracker)

    def keep(self, tracker: str, run_id: str) -> None:
        self.ids[tracker] = run_id
        atomic_write_text(self.path, json.dumps(self.ids, indent=1) + "\n")


def _columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    cols = list(rows[0])
    return cols, [[r.get(c) for c in cols] for r in rows]


class TensorBoardTracker:
    @staticmethod
    def check() -> None:
        _library("tensorboard", "torch.utils.tensorboard")

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, ids: _RunIds) -> None:
        writer_module = _library("tensorboard", "torch.utils.tensorboard")
        purge = None if resume_step is None else resume_step + 1
        self.writer = writer_module.SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows as a markdown table (TensorBoard's text tab renders it)."""
        cols, values = _columns(rows)
        cells = [[str("" if v is None else v).replace("|", "\\|").replace("\n", " ") for v in r] for r in values]
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)] +
                          ["| " + " | ".join(c) + " |" for c in cells])
        self.writer.add_text(name, table, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    @staticmethod
    def check() -> None:
        """W&B online (WANDB_MODE) needs credentials. `wandb.init` would look for them (WANDB_API_KEY, the settings
        files, .netrc) and then prompt on a terminal or raise; `wandb.login(prompt=False, verify=False)` runs the same
        look-up without prompting or the network, and returns False when there are none (wandb's documented API)."""
        wandb = _library("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode in OFFLINE_WANDB_MODES:
            return
        try:
            found = wandb.login(prompt=False, verify=False)
        except wandb.errors.Error as exc:  # credentials found but malformed
            raise ConfigError(f"train.report_to names wandb in WANDB_MODE={mode}, and W&B refused its credentials: "
                              f"{_one_line(exc)} Fix them with `wandb login --relogin`, or set WANDB_MODE=offline "
                              "(the default; `wandb sync` uploads the run later).") from None
        if not found:
            raise ConfigError(f"train.report_to names wandb in WANDB_MODE={mode}, which needs a W&B login, and none is "
                              "configured (no WANDB_API_KEY, no key in .netrc or W&B's settings). Run `wandb login` or "
                              "set WANDB_API_KEY; or set WANDB_MODE=offline (the default) to write the run into the "
                              "run directory and upload it later with `wandb sync`.")

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, ids: _RunIds) -> None:
        self.wandb = _library("wandb", "wandb")
        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]
        ids.keep("wandb", run_id)
        self.run = self.wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(run_dir),
                                   project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                                   id=run_id, resume="allow", config=config,
                                   settings=self.wandb.Settings(silent=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # resumed steps may repeat: W&B's own _step would drop them
        self.finished = False

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        self.run.log({**values, "step": int(row.get("step", 0))})
        if row.get("type") == "summary":
            self.run.summary.update(values)
            self.finished = True

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        cols, values = _columns(rows)
        self.run.log({name: self.wandb.Table(columns=cols, data=values), "step": step})

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished else 1)


class MlflowTracker:
    @staticmethod
    def check() -> None:
        """Open the store of MLFLOW_TRACKING_URI as the tracker will: MLflow refuses some stores outright (the
        retired file store, `file:./mlruns` or a plain path, unless MLFLOW_ALLOW_FILE_STORE=true). The default store,
        RUN_DIR/mlflow/mlflow.db, is created with the run."""
        _library("mlflow", "mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return
        try:
            MlflowClient(tracking_uri=uri)  # resolves the store (no request to a server)
        except MlflowException as exc:
            raise ConfigError(f"train.report_to names mlflow, and MLflow cannot open MLFLOW_TRACKING_URI={uri!r}: "
                              f"{_one_line(exc)} Point MLFLOW_TRACKING_URI at a database store "
                              "(sqlite:///PATH/mlflow.db) or a tracking server, or unset it to use the run's own store "
                              "(RUN_DIR/mlflow/mlflow.db), or remove mlflow from train.report_to.") from None

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, ids: _RunIds) -> None:
        _library("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        for noisy in ("mlflow", "alembic"):  # database migrations log at INFO on first use
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            store = run_dir / "mlflow"
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store.resolve() / 'mlflow.db'}", (store.resolve() / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = ids.get("mlflow")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"tunelab.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            ids.keep("mlflow", self.run_id)
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.finished = False

    def log(self, row: dict[str, Any]) -> None:
        import time

        now, step = int(time.time() * 1000), int(row.get("step", 0))
        metrics = [self.Metric(key, float(value), now, step) for key, value in scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.finished = self.finished or row.get("type") == "summary"

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        cols, values = _columns(rows)
        self.client.log_table(self.run_id, {c: [r[i] for r in values] for i, c in enumerate(cols)},
                              f"{name}/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "KILLED")


class TrackioTracker:
    @staticmethod
    def check() -> None:
        _library("trackio", "trackio")

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, ids: _RunIds) -> None:
        self.trackio = _library("trackio", "trackio")
        name = ids.get("trackio") or f"{run_dir.name}-{uuid.uuid4().hex[:6]}"
        ids.keep("trackio", name)
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=config,
                                     resume="allow", auto_log_cpu=False, auto_log_gpu=False)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=int(row.get("step", 0)))

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        cols, values = _columns(rows)
        self.run.log({name: self.trackio.Table(columns=cols, data=values)}, step=step)

    def close(self) -> None:
        self.trackio.finish()  # the module's finish: it also clears the current run, so its atexit hook does nothing


OPEN = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}


def check_trackers(names: list[str]) -> None:
    """Refuse, before the run writes anything, a tracker that cannot start: its library is missing, MLflow refuses
    MLFLOW_TRACKING_URI's store, W&B online has no login. Raises ConfigError with what to do."""
    for name in dict.fromkeys(names):
        OPEN[name].check()


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any], resume_step: int | None) -> list[Any]:
    ids = _RunIds(run_dir, resuming=resume_step is not None)
    opened: list[Any] = []
    try:
        for name in dict.fromkeys(names):
            opened.append(OPEN[name](run_dir, config, resume_step, ids))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
