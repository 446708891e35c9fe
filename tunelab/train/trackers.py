"""Experiment trackers that receive every metrics.jsonl row, through the tracker's own library.

metrics.jsonl and the HTML report are always written; `train.report_to` adds trackers. TensorBoard:
event files in RUN_DIR/tensorboard (torch.utils.tensorboard's SummaryWriter), one scalar per numeric
field as `<row type>/<field>` at the row's step, the resolved config as text, the final summary as
scalars; a resumed run purges the events after its resumed step, as metrics.jsonl drops its rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError

EXTRAS = {"tensorboard": "tensorboard"}  # tracker -> the pip extra that installs its library


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.report_to names tensorboard, whose library is not installed: "
                              "pip install 'tunelab[tensorboard]' (or remove it from train.report_to).") from None
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, row: dict[str, Any]) -> None:
        kind, step = row.get("type", "row"), int(row.get("step", 0))
        for key, value in row.items():
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows as a markdown table (TensorBoard's text tab renders it)."""
        if not rows:
            return
        cols = list(rows[0])
        cells = [[str(r.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in cols] for r in rows]
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)] +
                          ["| " + " | ".join(c) + " |" for c in cells])
        self.writer.add_text(name, table, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any], resume_step: int | None) -> list[Any]:
    return [TensorBoardTracker(run_dir, config, resume_step) for name in names if name == "tensorboard"]
