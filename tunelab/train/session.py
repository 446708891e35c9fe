"""Setting up a training session: the checks before anything is written, the device, the data, the run
directory, the model with its strategy, and the objects one optimizer step uses (batches, optimizer, schedule).

The recipe (train/loop.py) calls these in order; the `--measure` step timer (train/timing.py) builds its
session with the same `setup_device`, `prepare_model` and `open_session`, so the steps it times are the
recipe's own.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config, TrainConfig
from tunelab.data.audit import check_trainable
from tunelab.data.dataset import Split, load_datasets
from tunelab.data.render import spec_from_config, turn_end
from tunelab.errors import ConfigError
from tunelab.models.device import choose_device
from tunelab.models.load import enable_activation_checkpointing, pad_token_id
from tunelab.strategies.model import TrainModel
from tunelab.strategies.prepare import prepare_strategy
from tunelab.train.batches import BatchPlan, make_batch_plan, total_steps
from tunelab.train.distributed import DistInfo, barrier, init_distributed, wrap
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.rundir import RunLogHandler, check_run_dir, open_run_dir
from tunelab.train.runlock import check_unlocked
from tunelab.train.trackers import check_trackers

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(cfg: TrainConfig, info: DistInfo = DistInfo()) -> tuple[torch.device, torch.dtype | None]:
    """train.device and train.precision through the one device decision (this rank's GPU under torchrun)."""
    choice = choose_device(cfg.device, cfg.precision, info.local_rank if info.enabled else None, "train.device")
    return choice.device, choice.autocast_dtype


def set_denormal_mode(cfg: TrainConfig, device: torch.device) -> None:
    """On the CPU, flush denormal floats to zero (`train.flush_denormals`).

    The flag lives in each thread's floating-point control register, and the intra-op threads copy it from
    the thread that starts them, so this takes effect on every thread only when called before the first
    parallel operation of the process, as `tunelab train` does; later, it holds on the calling thread only.
    """
    if device.type == "cpu" and cfg.flush_denormals:
        torch.set_flush_denormal(True)


@dataclass(frozen=True)
class DeviceSetup:
    """Where a session computes, and in what precision."""

    device: torch.device
    amp_dtype: torch.dtype | None  # the autocast dtype (bf16), or None: fp32 throughout

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()


def setup_device(cfg: TrainConfig, info: DistInfo = DistInfo()) -> DeviceSetup:
    """Seed, choose the device and precision, and set the CPU's denormal mode, as every session starts."""
    seed_everything(cfg.seed)
    device, amp_dtype = resolve_device(cfg, info)
    set_denormal_mode(cfg, device)
    return DeviceSetup(device, amp_dtype)


def check_processes(cfg: Config, world: int) -> None:
    """Refuse what a run of `world` processes cannot do (`tunelab train --nproc` asks before starting any)."""
    if cfg.train.sample_every and world > 1:
        raise ConfigError("train.sample_every generates on one process, and this run has "
                          f"{world}: remove it, or sample with `tunelab generate` after the run.")


def check_before_writing(cfg: Config) -> DistInfo:
    """Join torchrun's process group and refuse what would fail later, before anything is written: sampling
    under several processes, a locked or foreign output_dir, a tracker that cannot start."""
    info = init_distributed()
    check_processes(cfg, info.world)
    if info.is_main:  # rank 0 takes the lock (open_run); a second writer is refused here, naming the holder
        check_unlocked(Path(cfg.output_dir))
    check_run_dir(cfg)
    if info.is_main:  # only rank 0 reports to trackers
        check_trackers(cfg.train.report_to)
    return info


@dataclass
class TrainingData:
    """The encoded train and eval splits of a run, with what batching and generation need to know of them."""

    train: Split
    eval: Split | None
    pad_id: int
    stop_text: str  # what ends an answer: the end of a chat turn, or nothing

    @property
    def train_set(self) -> Any:
        return self.train.encoded

    @property
    def eval_set(self) -> Any:
        return self.eval.encoded if self.eval else None


def load_training_data(cfg: Config, tokenizer: Any, info: DistInfo) -> TrainingData:
    """Read, render and encode the train (and eval) data, and check that it can be trained on. Rank 0 encodes
    into the data cache; the other ranks read what it wrote."""
    if not info.is_main:
        barrier()
    train_split, eval_split = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)
    if info.is_main:
        barrier()
    check_trainable(train_split.stats, train_split.num_chosen, cfg.data.max_length, cfg.data.train_path)
    stop_text = turn_end(spec_from_config(cfg), tokenizer, train_split.shape == "chat")
    return TrainingData(train_split, eval_split, pad_token_id(tokenizer), stop_text)


def open_run(cfg: Config, info: DistInfo, data: TrainingData,
             on_exit: contextlib.ExitStack) -> tuple[Path, RunLogHandler]:
    """The run directory (rank 0 creates and locks it; the others follow) and its log file, train.log
    (train-rankN.log on the other ranks). Lock and log are released on `on_exit`."""
    if info.is_main:
        run_dir, lock = open_run_dir(cfg)
        on_exit.callback(lock.release)
    else:
        run_dir = Path(cfg.output_dir)
    barrier()
    file_log = RunLogHandler(run_dir / (f"train-rank{info.rank}.log" if info.rank else "train.log"))
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("tunelab").addHandler(file_log)
    on_exit.callback(file_log.close)
    on_exit.callback(logging.getLogger("tunelab").removeHandler, file_log)
    if not info.is_main:
        logging.getLogger("tunelab").setLevel(logging.WARNING)
    # the data summaries went to the console as the data loaded, before the run log existed: now into it alone
    for name, split in (("train", data.train), ("eval", data.eval)):
        if split is not None and info.is_main:
            file_log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, f"{name} data: %s",
                                           (split.stats.summary(),), None))
    return run_dir, file_log


def prepare_model(model: Any, cfg: Config, tokenizer: Any, device: torch.device) -> TrainModel:
    """The loaded base with the strategy applied (what trains, what is added), on `device`, in training mode,
    with activation checkpointing when train.activation_checkpointing asks for it."""
    model = prepare_strategy(model, cfg.strategy, tokenizer, cfg.train.seed).to(device)
    model.train()
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model.base)
    return model


def use_speed_options(model: TrainModel, cfg: TrainConfig, device: torch.device) -> None:
    """train.loss_kernel, and train.compile (on, or auto on CUDA) of the decoder, in place: parameter names
    (and checkpoints) stay the same."""
    model.loss_kernel = cfg.loss_kernel
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        model.base.get_decoder().compile()


@dataclass
class Session:
    """A training session, set up: what one optimizer step (`loop.take_step`) runs."""

    cfg: TrainConfig  # the config's train section
    info: DistInfo
    hw: DeviceSetup
    train_model: TrainModel  # the strategy's model (generation, saving)
    model: Any  # what the step runs: `train_model`, or its DDP / FSDP2 wrapping under torchrun
    plan: BatchPlan
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]  # the optimizer's parameters: what is clipped, measured and checked


def open_session(cfg: Config, model: TrainModel, examples: Any, pad_id: int, hw: DeviceSetup,
                 info: DistInfo = DistInfo(), stream: Any = None, steps: int | None = None) -> Session:
    """Data parallelism (under torchrun), the batch plan of `examples` (or of `stream`, data.streaming), the
    optimizer and its schedule over `steps` (by default the run's total)."""
    wrapped = wrap(model, cfg.distributed.strategy, hw.device, hw.amp_dtype is not None) if info.enabled else model
    plan = make_batch_plan(cfg, examples, pad_id, can_pack=model.can_pack, virtual_tokens=model.virtual_tokens,
                           why_not_packed=model.pack_refusal, rank=info.rank, world=info.world, stream=stream)
    steps = steps or total_steps(cfg, plan)
    optimizer = build_optimizer(wrapped, cfg.train, hw.device)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    # clip, measure and check exactly what the update changes: the optimizer's parameters. (Under FSDP2 the module's
    # own list is not those while a group is unsharded, as the root stays after a forward without backward:
    # model.parameters() then yields its gathered copies, whose gradients clipping would miss.)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    return Session(cfg.train, info, hw, model, wrapped, plan, steps, optimizer, scheduler, trainable)
