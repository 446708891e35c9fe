"""What a run reports as it goes: metrics.jsonl rows (each also sent to the trackers of train.report_to), the
held-out loss, the sample predictions (samples.jsonl), and the run's log file, which closes with them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config
from tunelab.strategies.model import ParamCount, TrainModel
from tunelab.train.distributed import DistInfo
from tunelab.train.eval_loss import evaluate_loss
from tunelab.runfiles import RunFiles
from tunelab.train.metrics import MetricsWriter, peak_rss_bytes
from tunelab.train.samples import sample_examples, sample_predictions
from tunelab.train.session import DeviceSetup, TrainingData
from tunelab.train.trackers import open_trackers

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


class RunReporter:
    """Opens the trackers and metrics.jsonl (on rank 0; a resumed run keeps the rows up to `resume_step`) and
    writes the rows of a run; `evaluate` and `sample` run the model on the held-out data for them. Without
    `sampling` (a run that trains nothing), train.sample_every is not acted on."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, file_log: logging.Handler, data: TrainingData,
                 hw: DeviceSetup, tokenizer: Any, resume_step: int | None = None, sampling: bool = True) -> None:
        self.cfg, self.data, self.hw, self.tokenizer, self.file_log = cfg, data, hw, tokenizer, file_log
        self.trackers = open_trackers(cfg.train.report_to, run_dir, cfg.model_dump(mode="json"), resume_step) \
            if info.is_main else []
        self.metrics = MetricsWriter(RunFiles(run_dir).metrics, resume_step=resume_step, enabled=info.is_main,
                                     trackers=self.trackers)
        t = cfg.train
        self.sampled = sample_examples(data.eval_set, data.train_set, t.num_samples) if t.sample_every and sampling \
            else []
        self.samples = MetricsWriter(RunFiles(run_dir).samples, resume_step=resume_step, enabled=bool(self.sampled))

    def write_start(self, params: ParamCount) -> None:
        """The rows of a run's start: its parameter counts and its training data."""
        self.metrics.write({"type": "params", "step": 0, "trainable_params": params.trainable,
                            "total_params": params.total, "trainable_share": params.share})
        st, stream = self.data.train.stats, self.data.train.stream
        self.metrics.write({"type": "data", "step": 0, "num_examples": st.num_examples, "num_tokens": st.num_tokens,
                            "num_label_tokens": st.num_label_tokens, "prompts_truncated": st.prompts_truncated,
                            "targets_truncated": st.targets_truncated, "dropped": st.dropped,
                            "turn_end": self.data.stop_text,
                            **({"streamed": "the figures are the first buffer's"} if stream else {})})

    def evaluate(self, model: Any, step: int, virtual_tokens: int = 0) -> dict[str, float]:
        """Held-out loss and token accuracy of `model` (as the step runs it), written as an eval row."""
        result = evaluate_loss(model, self.data.eval_set, self.cfg.train.batch_size, self.data.pad_id, self.hw.device,
                               self.hw.autocast(), virtual_tokens)
        self.metrics.write({"type": "eval", "step": step, **result})
        return result

    def sample(self, model: TrainModel, step: int) -> None:
        """Greedy predictions for the sampled held-out prompts, into samples.jsonl and each tracker's table."""
        rows = sample_predictions(model, self.sampled, self.tokenizer, self.data.pad_id, self.cfg.train.sample_tokens,
                                  step, self.hw.device, self.data.stop_text)
        for row in rows:
            self.samples.write(row)
        for tracker in self.trackers:
            tracker.log_table("samples", rows, step)

    def write_summary(self, step: int, **figures: Any) -> None:
        self.metrics.write({"type": "summary", "step": step, "peak_memory_bytes": peak_memory_bytes(self.hw.device),
                            **figures})

    def close(self) -> None:
        """Close the metrics (and trackers), the samples and the run's log file."""
        self.metrics.close()
        self.samples.close()
        logging.getLogger("tunelab").removeHandler(self.file_log)
        self.file_log.close()
