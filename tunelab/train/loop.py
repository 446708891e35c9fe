"""The supervised fine-tuning recipe: read top to bottom, it is the whole training run.

Maximise log Pr(target | prompt): the loss is summed over target tokens and divided by the
number of target tokens in the whole optimizer step (all micro-batches), so gradient
accumulation gives the same update as one big batch.

`run_recipe` is the recipe, `run_steps` its loop and `take_step` one optimizer step; what they set up
(device, data, run directory, model, optimizer, checkpointer) comes from train/session.py and
train/checkpointer.py, and the `--measure` step timer (train/timing.py) times this same `take_step`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.atomic import is_disk_full
from tunelab.config import Config, TrainConfig
from tunelab.data.batching import count_label_tokens
from tunelab.errors import DiskFullError, NonFiniteError
from tunelab.models.device import cpu_has_amx
from tunelab.models.linear_cross_entropy import check_loss_kernel
from tunelab.models.load import load_model, load_tokenizer
from tunelab.strategies.final import save_final
from tunelab.strategies.model import ParamCount, TrainModel, count_parameters
from tunelab.strategies.prepare import prepare_strategy
from tunelab.strategies.registry import resolve
from tunelab.train.checkpoint import disk_full_message, list_checkpoints
from tunelab.train.checkpointer import Checkpointer, make_checkpointer
from tunelab.train.distributed import DistInfo, all_reduce_sum, check_sharding, gradient_sync
from tunelab.train.optim import check_optimizer
from tunelab.train.loss import causal_lm_loss
from tunelab.train.progress import Progress
from tunelab.train.reporting import RunReporter
from tunelab.train.session import (DeviceSetup, Session, TrainingData, check_before_writing, load_training_data,
                                   open_run, open_session, prepare_model, setup_device, use_speed_options)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval: dict[str, float] | None
    final_dir: Path | None  # None for tuning-free prompting: nothing was trained
    model: Any = None  # the trained TrainModel, still in memory


@dataclass(frozen=True)
class StepFigures:
    """One optimizer step, summed over every rank."""

    loss: float  # the token-normalised training loss
    grad_norm: float  # before clipping
    lr: float
    num_tokens: int
    num_label_tokens: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def accumulate_gradients(model: Any, micro_batches: list[tuple[dict[str, torch.Tensor], int]], scale: float,
                         device: torch.device, autocast: Any, trainable: list[torch.nn.Parameter],
                         max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches (each loss sum times `scale`), then gradient
    clipping. Returns the summed loss and the gradient norm before clipping (tensors: the caller decides
    when the host syncs)."""
    loss_sum = torch.zeros((), device=device)
    for i, (mb, _) in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast():
                out = causal_lm_loss(model, mb)
            # backward outside autocast (as PyTorch advises): its cache of bf16 weight copies is let go, so each
            # copy is freed once the backward pass has used it (SmolLM2 full tuning: a lower peak)
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach()
    return loss_sum, torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))


def apply_update(optimizer: torch.optim.Optimizer, scheduler: Any, update: bool = True) -> float:
    """The update (unless `update` is False: a skipped non-finite step) and the schedule; returns the
    learning rate of this step. A skipped step still advances the schedule, so the learning rate stays a
    function of the step number and the run ends at the planned step."""
    lr = scheduler.get_last_lr()[0]
    if update:
        optimizer.step()
    with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule stepped first
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def take_step(s: Session) -> StepFigures:
    """One optimizer step of the session: this rank's micro-batches forward and backward, one host sync, then the
    update, unless the loss or the gradient norm is NaN or infinite: such an update is never applied (every rank
    sees the same summed loss and global gradient norm, so all decide alike)."""
    micro_batches = s.plan.next_step()  # this rank's slice of the step
    num_label_tokens = sum(count_label_tokens(mb["labels"]) for mb, _ in micro_batches)
    num_tokens = sum(n for _, n in micro_batches)
    if s.info.enabled:  # the loss is normalised by the target tokens of every rank
        num_label_tokens = int(all_reduce_sum(num_label_tokens, s.hw.device))
        num_tokens = int(all_reduce_sum(num_tokens, s.hw.device))
    scale = s.info.world / num_label_tokens  # DDP and FSDP average gradients over ranks: undo it
    loss_sum, grad_norm = accumulate_gradients(s.model, micro_batches, scale, s.hw.device, s.hw.autocast, s.trainable,
                                               s.cfg.max_grad_norm)
    if s.info.enabled:
        loss_sum = torch.tensor(all_reduce_sum(float(loss_sum), s.hw.device))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss, grad_norm = float(loss_sum) / num_label_tokens, float(grad_norm)  # the step's one host sync
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = apply_update(s.optimizer, s.scheduler, update=finite)
    return StepFigures(loss, grad_norm, lr, num_tokens, num_label_tokens)


def weights_finite(trainable: list[torch.nn.Parameter], info: DistInfo, device: torch.device) -> bool:
    """Whether every trainable weight is finite (one host sync; under torchrun a collective over the shards).
    Checked before anything is saved, so no checkpoint and no final/ ever holds a NaN."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainable]
    finite = bool(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all())
    if info.enabled:
        finite = all_reduce_sum(0 if finite else 1, device) == 0
    return finite


def nonfinite_message(step: int, what: str, cfg: TrainConfig, run_dir: Path) -> str:
    """The paragraph for a run stopped by a NaN or infinity: the step, the last good checkpoint, the fix."""
    done = list_checkpoints(run_dir)
    kept = (f"the last good checkpoint is '{done[-1]}'" if done else
            "there is no checkpoint to go back to (train.save_every keeps some)")
    clip = f"now {cfg.max_grad_norm:g}" if cfg.max_grad_norm else "now off"
    return (f"step {step}: {what}. Nothing non-finite was saved: no final/ was written, and {kept}. This usually "
            f"means the learning rate is too high for this model: lower train.learning_rate (now "
            f"{cfg.learning_rate:g}), add warmup with train.warmup_steps (now {cfg.warmup_steps}), or clip gradients "
            f"with train.max_grad_norm ({clip}), then start again with --overwrite. For a rare bad batch, "
            "train.on_nonfinite: skip skips such steps (up to train.max_nonfinite_skips)" +
            (", and --resume with it continues from that checkpoint." if done else "."))


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def handle_nonfinite_step(step: int, figures: StepFigures, skips: int, cfg: TrainConfig, run_dir: Path) -> None:
    """A step whose loss or gradient norm is NaN or infinite (its update was not applied): stop the run
    (train.on_nonfinite: stop, or more skips than train.max_nonfinite_skips), else warn that it was skipped."""
    what = f"the training loss is {_fmt(figures.loss)} and the gradient norm {_fmt(figures.grad_norm)}"
    if cfg.on_nonfinite == "stop":
        raise NonFiniteError(nonfinite_message(
            step, f"{what}, so the run stopped before applying that update (train.on_nonfinite: stop)", cfg, run_dir))
    if skips > cfg.max_nonfinite_skips:
        raise NonFiniteError(nonfinite_message(
            step, f"{what}: {skips} non-finite steps in this run, more than train.max_nonfinite_skips "
                  f"({cfg.max_nonfinite_skips}) allows, so the run stopped", cfg, run_dir))
    log.warning("step %d: %s; its update was skipped (%d of train.max_nonfinite_skips %d)", step, what, skips,
                cfg.max_nonfinite_skips)


@dataclass(frozen=True)
class ResumePoint:
    step: int = 0  # the last step done
    nonfinite_skips: int = 0  # non-finite steps skipped so far in the run (train.on_nonfinite: skip)
    resumed: bool = False  # from a checkpoint

    @property
    def resume_step(self) -> int | None:
        return self.step if self.resumed else None


def resume_point(cfg: Config, checkpointer: Checkpointer, session: Session) -> ResumePoint:
    """Step 0, or with --resume the newest complete checkpoint, its model, optimizer, schedule, RNG and data
    position restored into the session."""
    latest = checkpointer.latest() if cfg.resume else None
    if latest is None:
        if cfg.resume:
            log.info("no complete checkpoint in %s: starting from step 0", checkpointer.run_dir)
        return ResumePoint()
    state = checkpointer.load(latest)
    position = session.plan.stream.position
    session.plan.stream.position = type(position)(**state["data_position"])
    log.info("resumed from %s (step %d)", latest, state["step"])
    return ResumePoint(state["step"], state.get("nonfinite_skips", 0), resumed=True)


def evaluate_only(cfg: Config, info: DistInfo, run_dir: Path, file_log: logging.Handler, model: TrainModel,
                  params: ParamCount, data: TrainingData, hw: DeviceSetup, tokenizer: Any) -> TrainResult:
    """Tuning-free prompting: nothing trains; the run holds its parameter count and eval figures."""
    reporter = RunReporter(cfg, info, run_dir, file_log, data, hw, tokenizer, sampling=False)
    reporter.metrics.write({"type": "params", "step": 0, "trainable_params": 0, "total_params": params.total,
                            "trainable_share": 0.0})
    result = None
    if data.eval_set:
        result = reporter.evaluate(model, 0)
        log.info("prompting (nothing trained): eval loss %.4f", result["eval_loss"])
    reporter.write_summary(0, loop_seconds=0.0)
    reporter.close()
    return TrainResult(run_dir, 0, float("nan"), result, None, model)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training run that `cfg` describes; returns where its results are.

    Under torchrun every rank runs this same recipe on its slice of each step. The run directory stays
    locked from its opening to the end of the run, however the run ends. A write that finds the disk full
    stops the run with `DiskFullError`; a NaN or infinite loss with `NonFiniteError` (`train.on_nonfinite`).
    """
    with contextlib.ExitStack() as on_exit:  # what is undone however the run ends: the lock, the log file
        try:
            return run_recipe(cfg, on_exit)
        except DiskFullError as exc:
            raise DiskFullError(disk_full_message(exc.path, Path(cfg.output_dir)), exc.path) from None
        except OSError as exc:  # a write outside a checkpoint (metrics.jsonl, config.yaml)
            if not is_disk_full(exc):
                raise
            raise DiskFullError(disk_full_message(exc.filename, Path(cfg.output_dir)), exc.filename) from None


def run_recipe(cfg: Config, on_exit: contextlib.ExitStack) -> TrainResult:
    """The recipe of `train`; what must be undone at the end is registered on `on_exit`."""
    # 1. check everything that can be wrong before writing anything: output_dir, trackers, device, data, model
    info = check_before_writing(cfg)
    check_sharding(cfg.distributed.strategy, cfg.strategy.lora.quantize, info)
    hw = setup_device(cfg.train, info)
    check_loss_kernel(cfg.train.loss_kernel, hw.device)
    check_optimizer(cfg.train, hw.device)
    tokenizer = load_tokenizer(cfg.model)
    data = load_training_data(cfg, tokenizer, info)
    model = load_model(cfg.model, device_type=hw.device.type, quantize=cfg.strategy.lora)

    # 2. the run directory and its log (rank 0 writes; the others follow)
    run_dir, file_log = open_run(cfg, info, data, on_exit)

    # 3. strategy: decide what trains and what is added; speed options
    model = prepare_model(model, cfg, tokenizer, hw.device)
    use_speed_options(model, cfg.train, hw.device)
    params = count_parameters(model)
    log.info("strategy %s: %s on %s (%s)%s", cfg.strategy.name, params.summary(), hw.device,
             "bf16 autocast" if hw.amp_dtype else "fp32",
             f", {info.world} processes ({cfg.distributed.strategy})" if info.enabled else "")
    if hw.device.type == "cpu" and hw.amp_dtype is None and cfg.train.precision == "auto" and cpu_has_amx():
        log.info("this CPU has AMX: train.precision: bf16 (autocast; float32 weights and optimizer) trains faster")
    if not resolve(cfg.strategy).trains_anything:
        return evaluate_only(cfg, info, run_dir, file_log, model, params, data, hw, tokenizer)

    # 4. data parallelism, batches, optimizer, schedule, checkpoints: restore them all when resuming
    session = open_session(cfg, model, data.train_set, data.pad_id, hw, info, stream=data.train.stream)
    checkpointer = make_checkpointer(run_dir, session, cfg.train.keep_checkpoints, lambda: prepare_strategy(
        load_model(cfg.model, quantize=cfg.strategy.lora), cfg.strategy, tokenizer, cfg.train.seed))
    start = resume_point(cfg, checkpointer, session)
    reporter = RunReporter(cfg, info, run_dir, file_log, data, hw, tokenizer, start.resume_step)
    if not start.resumed:
        reporter.write_start(params)

    # 5. the loop
    end = run_steps(session, checkpointer, reporter, start)
    if end.stopped:
        return TrainResult(run_dir, end.step, end.loss, end.eval, None, session.model)

    # 6. the result, in Hugging Face (or peft) format (under torchrun, gathered on rank 0)
    saves = resolve(cfg.strategy).saves
    final_dir = checkpointer.save_final(lambda m: save_final(run_dir, m, tokenizer, cfg.model.path, saves))
    log.info("done: %d steps, final train loss %.4f; model in %s", end.step, end.loss, final_dir)
    return TrainResult(run_dir, end.step, end.loss, end.eval, final_dir, session.model)


@dataclass(frozen=True)
class LoopEnd:
    step: int  # the last step done
    loss: float  # its training loss
    eval: dict[str, float] | None  # the latest evaluation
    stopped: bool  # by train.stop_after, before the last step


def run_steps(s: Session, checkpointer: Checkpointer, reporter: RunReporter, start: ResumePoint) -> LoopEnd:
    """The loop: every step after `start` to the last, its row, and the evaluations, samples and checkpoints on
    their schedules, until the end or train.stop_after. Nothing non-finite is ever saved (NonFiniteError); the
    reporter is closed however the loop ends."""
    cfg, tm, eval_set, run_dir = s.cfg, s.train_model, reporter.data.eval_set, checkpointer.run_dir

    def run_eval(step: int) -> dict[str, float]:
        result = reporter.evaluate(s.model, step, tm.virtual_tokens)
        log.info("step %d: eval loss %.4f, token accuracy %.3f", step, result["eval_loss"],
                 result["eval_token_accuracy"])
        return result

    eval_result = run_eval(0) if eval_set and cfg.eval_every and start.step == 0 else None
    if reporter.sampled and start.step == 0:
        reporter.sample(tm, 0)
    progress = Progress(s.steps, start.step, enabled=cfg.progress and s.info.is_main)
    loss, skips = float("nan"), start.nonfinite_skips
    loop_start = time.perf_counter()
    try:
        for step in range(start.step + 1, s.steps + 1):
            t0 = time.perf_counter()
            figures = take_step(s)
            seconds, loss = time.perf_counter() - t0, figures.loss
            row = {"type": "train", "step": step, "loss": loss, "lr": figures.lr, "grad_norm": figures.grad_norm,
                   "num_tokens": figures.num_tokens, "num_label_tokens": figures.num_label_tokens,
                   "tokens_per_s": figures.num_tokens / seconds, "epoch": round(s.plan.stream.epochs_done(), 4),
                   "seconds": seconds, "elapsed_s": time.perf_counter() - loop_start}
            if not figures.finite:
                skips += 1
                reporter.metrics.write({**row, "skipped": True})  # whatever log_every says
                handle_nonfinite_step(step, figures, skips, cfg, run_dir)
            elif step % cfg.log_every == 0 or step == s.steps:
                reporter.metrics.write(row)
            progress.update(row)
            if eval_set and ((cfg.eval_every and step % cfg.eval_every == 0) or step == s.steps):
                eval_result = run_eval(step)
            if reporter.sampled and (step % cfg.sample_every == 0 or step == s.steps):
                reporter.sample(tm, step)
            stopping = cfg.stop_after == step and step < s.steps
            saving = (cfg.save_every and step % cfg.save_every == 0) or stopping
            if (saving or step == s.steps) and not weights_finite(s.trainable, s.info, s.hw.device):
                raise NonFiniteError(nonfinite_message(step, "the update of this step made weights NaN or infinite "
                                                       "(its loss and gradient norm were finite)", cfg, run_dir))
            if saving:
                checkpointer.save(step, {"data_position": vars(s.plan.stream.position), "loss": loss,
                                         "nonfinite_skips": skips})
            if stopping:
                log.info("stopped at step %d of %d (train.stop_after); continue with --resume", step, s.steps)
                return LoopEnd(step, loss, eval_result, stopped=True)
        reporter.write_summary(s.steps, loop_seconds=time.perf_counter() - loop_start, processes=s.info.world)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; the newest checkpoint is {checkpointer.latest() or 'none'}; "
                                "continue with --resume") from None
    finally:
        progress.close()
        reporter.close()
    return LoopEnd(s.steps, loss, eval_result, stopped=False)
