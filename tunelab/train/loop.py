"""The supervised fine-tuning recipe: read top to bottom, it is the whole training run.

Maximise log Pr(target | prompt): the loss is summed over target tokens and divided by the
number of target tokens in the whole optimizer step (all micro-batches), so gradient
accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config, TrainConfig
from tunelab.data.audit import check_trainable
from tunelab.data.batching import count_label_tokens
from tunelab.data.dataset import load_datasets
from tunelab.data.render import spec_from_config, turn_end
from tunelab.errors import ConfigError, DiskFullError, NonFiniteError
from tunelab.models.load import enable_activation_checkpointing, load_model, load_tokenizer, pad_token_id
from tunelab.models.device import choose_device
from tunelab.models.linear_cross_entropy import check_loss_kernel
from tunelab.strategies.model import count_parameters
from tunelab.strategies.registry import resolve
from tunelab.strategies.prepare import prepare_strategy
from tunelab.strategies.export import save_final
from tunelab.train.batches import make_batch_plan, total_steps
from tunelab.train.checkpoint import disk_full_message, is_disk_full, list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.distributed import (DistInfo, all_reduce_sum, barrier, check_sharding, full_state_dict,
                                       gradient_sync, init_distributed, load_consolidated, load_sharded, save_sharded,
                                       wrap)
from tunelab.train.eval_loss import evaluate_loss
from tunelab.train.loss import causal_lm_loss
from tunelab.train.metrics import MetricsWriter, peak_rss_bytes
from tunelab.train.samples import sample_examples, sample_predictions
from tunelab.train.trackers import open_trackers
from tunelab.train.optim import build_optimizer, build_scheduler, check_optimizer
from tunelab.train.progress import Progress
from tunelab.train.rundir import RunLogHandler, check_run_dir, open_run_dir
from tunelab.train.runlock import check_unlocked

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval: dict[str, float] | None
    final_dir: Path | None  # None for tuning-free prompting: nothing was trained
    model: Any = None  # the trained TrainModel, still in memory


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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def evaluate_only(cfg: Config, run_dir: Path, model: Any, params: Any, eval_set: Any, pad_id: int,
                  device: torch.device, autocast: Any, file_log: logging.Handler) -> TrainResult:
    """Tuning-free prompting: nothing trains; the run holds its parameter count and eval figures."""
    trackers = open_trackers(cfg.train.report_to, run_dir, cfg.model_dump(mode="json"), None)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", trackers=trackers)
    metrics.write({"type": "params", "step": 0, "trainable_params": 0, "total_params": params.total,
                   "trainable_share": 0.0})
    result = None
    if eval_set:
        result = evaluate_loss(model, eval_set, cfg.train.batch_size, pad_id, device, autocast(), 0)
        metrics.write({"type": "eval", "step": 0, **result})
        log.info("prompting (nothing trained): eval loss %.4f", result["eval_loss"])
    metrics.write({"type": "summary", "step": 0, "peak_memory_bytes": peak_memory_bytes(device), "loop_seconds": 0.0})
    metrics.close()
    logging.getLogger("tunelab").removeHandler(file_log)
    file_log.close()
    return TrainResult(run_dir, 0, float("nan"), result, None, model)


def accumulate_gradients(model: Any, micro_batches: list[tuple[dict[str, torch.Tensor], int]], scale: float,
                         device: torch.device, autocast: Any, trainable: list[torch.nn.Parameter],
                         max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches (each loss sum times `scale`), then gradient
    clipping. Returns the summed loss and the gradient norm before clipping (tensors: the caller decides
    when the host syncs)."""
    loss_sum = torch.zeros((), device=device)
    for i, (mb, _) in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with gradient_sync(model, i == len(micro_batches) - 1), autocast():
            out = causal_lm_loss(model, mb)
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


def optimizer_step(model: Any, micro_batches: list[tuple[dict[str, torch.Tensor], int]], scale: float,
                   device: torch.device, autocast: Any, trainable: list[torch.nn.Parameter], max_grad_norm: float | None,
                   optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step (`accumulate_gradients`, then `apply_update`) without the loop's non-finite check.
    Returns the summed loss and the gradient norm (tensors) and the learning rate used."""
    loss_sum, grad_norm = accumulate_gradients(model, micro_batches, scale, device, autocast, trainable, max_grad_norm)
    return loss_sum, grad_norm, apply_update(optimizer, scheduler)


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
    # 1. check everything that can be wrong before writing anything: output_dir, device, data, model
    info = init_distributed()
    if cfg.train.sample_every and info.world > 1:
        raise ConfigError("train.sample_every generates on one process, and this run has "
                          f"{info.world}: remove it, or sample with `tunelab generate` after the run.")
    check_sharding(cfg.distributed.strategy, cfg.strategy.lora.quantize, info)
    if info.is_main:  # rank 0 takes the lock (step 2); a second writer is refused here, naming the holder
        check_unlocked(Path(cfg.output_dir))
    check_run_dir(cfg)
    seed_everything(cfg.train.seed)
    device, amp_dtype = resolve_device(cfg.train, info)
    check_loss_kernel(cfg.train.loss_kernel, device)
    check_optimizer(cfg.train, device)
    set_denormal_mode(cfg.train, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    tokenizer = load_tokenizer(cfg.model)
    if not info.is_main:  # rank 0 encodes the data into the cache; the others read what it wrote
        barrier()
    train_split, eval_split = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)
    if info.is_main:
        barrier()
    check_trainable(train_split.stats, train_split.num_chosen, cfg.data.max_length, cfg.data.train_path)
    stop_text = turn_end(spec_from_config(cfg), tokenizer, train_split.shape == "chat")  # what ends an answer
    train_set, eval_set = train_split.encoded, eval_split.encoded if eval_split else None
    pad_id = pad_token_id(tokenizer)
    model = load_model(cfg.model, device_type=device.type, quantize=cfg.strategy.lora)

    # 2. the run directory (rank 0 writes; the others follow)
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
    for name, split in (("train", train_split), ("eval", eval_split)):
        if split is not None and info.is_main:
            file_log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, f"{name} data: %s",
                                           (split.stats.summary(),), None))

    # 3. strategy: decide what trains and what is added; speed options; data parallelism
    model = prepare_strategy(model, cfg.strategy, tokenizer, cfg.train.seed).to(device)
    model.loss_kernel = cfg.train.loss_kernel
    model.train()
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model.base)
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda"):
        model.base.get_decoder().compile()  # in place: parameter names (and checkpoints) stay the same
    params = count_parameters(model)
    log.info("strategy %s: %s on %s (%s)%s", cfg.strategy.name, params.summary(), device,
             "bf16 autocast" if amp_dtype else "fp32",
             f", {info.world} processes ({cfg.distributed.strategy})" if info.enabled else "")
    if not resolve(cfg.strategy).trains_anything:
        return evaluate_only(cfg, run_dir, model, params, eval_set, pad_id, device, autocast, file_log)
    tm = model
    if info.enabled:
        model = wrap(model, cfg.distributed.strategy, device, amp_dtype is not None)

    # 4. batches, optimizer, schedule; restore all of them when resuming
    plan = make_batch_plan(cfg, train_set, pad_id, can_pack=tm.can_pack, virtual_tokens=tm.virtual_tokens,
                           why_not_packed=tm.pack_refusal,
                           rank=info.rank, world=info.world, stream=train_split.stream)
    steps = total_steps(cfg, plan)
    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    start_step, skips = 0, 0  # skips: non-finite steps skipped so far in the run (train.on_nonfinite: skip)
    checkpoints = list_checkpoints(run_dir) if cfg.resume else []
    if checkpoints:
        if info.enabled:
            state = load_sharded(checkpoints[-1], model, optimizer, scheduler, info)
        else:
            state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        start_step, plan.stream.position = state["step"], type(plan.stream.position)(**state["data_position"])
        skips = state.get("nonfinite_skips", 0)
        log.info("resumed from %s (step %d)", checkpoints[-1], start_step)
    elif cfg.resume:
        log.info("no complete checkpoint in %s: starting from step 0", run_dir)
    resume_step = start_step if checkpoints else None
    trackers = open_trackers(cfg.train.report_to, run_dir, cfg.model_dump(mode="json"), resume_step) \
        if info.is_main else []
    metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_step=resume_step, enabled=info.is_main,
                            trackers=trackers)
    if not checkpoints:
        metrics.write({"type": "params", "step": 0, "trainable_params": params.trainable,
                       "total_params": params.total, "trainable_share": params.share})
        st = train_split.stats
        metrics.write({"type": "data", "step": 0, "num_examples": st.num_examples, "num_tokens": st.num_tokens,
                       "num_label_tokens": st.num_label_tokens, "prompts_truncated": st.prompts_truncated,
                       "targets_truncated": st.targets_truncated, "dropped": st.dropped,
                       "turn_end": stop_text,
                       **({"streamed": "the figures are the first buffer's"} if train_split.stream else {})})

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate_loss(model, eval_set, cfg.train.batch_size, pad_id, device, autocast(), tm.virtual_tokens)
        metrics.write({"type": "eval", "step": step, **result})
        log.info("step %d: eval loss %.4f, token accuracy %.3f", step, result["eval_loss"], result["eval_token_accuracy"])
        return result

    eval_result = run_eval(0) if eval_set and cfg.train.eval_every and start_step == 0 else None

    sampled = sample_examples(eval_set, train_set, cfg.train.num_samples) if cfg.train.sample_every else []
    samples = MetricsWriter(run_dir / "samples.jsonl", resume_step=resume_step, enabled=bool(sampled))

    def run_samples(step: int) -> None:
        rows = sample_predictions(tm, sampled, tokenizer, pad_id, cfg.train.sample_tokens, step, device, stop_text)
        for row in rows:
            samples.write(row)
        for tracker in trackers:
            tracker.log_table("samples", rows, step)

    if sampled and start_step == 0:
        run_samples(0)

    # 5. the loop
    progress = Progress(steps, start_step, enabled=cfg.train.progress and info.is_main)
    loss = float("nan")
    loop_start = time.perf_counter()
    # clip, measure and check exactly what the update changes: the optimizer's parameters. (Under FSDP2 the module's
    # own list is not those while a group is unsharded, as the root stays after a forward without backward:
    # model.parameters() then yields its gathered copies, whose gradients clipping would miss.)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            micro_batches = plan.next_step()  # this rank's slice of the step
            num_label_tokens = sum(count_label_tokens(mb["labels"]) for mb, _ in micro_batches)
            num_tokens = sum(n for _, n in micro_batches)
            if info.enabled:  # the loss is normalised by the target tokens of every rank
                num_label_tokens = int(all_reduce_sum(num_label_tokens, device))
                num_tokens = int(all_reduce_sum(num_tokens, device))
            scale = info.world / num_label_tokens  # DDP and FSDP average gradients over ranks: undo it
            loss_sum, grad_norm = accumulate_gradients(model, micro_batches, scale, device, autocast, trainable,
                                                       cfg.train.max_grad_norm)
            if info.enabled:
                loss_sum = torch.tensor(all_reduce_sum(float(loss_sum), device))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # the host syncs once per step, before the update: a NaN or infinity is never applied (every rank
            # sees the same summed loss and global gradient norm, so all decide alike)
            loss, grad_norm = float(loss_sum) / num_label_tokens, float(grad_norm)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            lr = apply_update(optimizer, scheduler, update=finite)
            seconds = time.perf_counter() - t0
            row = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "num_tokens": num_tokens, "num_label_tokens": num_label_tokens,
                   "tokens_per_s": num_tokens / seconds, "epoch": round(plan.stream.epochs_done(), 4), "seconds": seconds,
                   "elapsed_s": time.perf_counter() - loop_start}
            if not finite:
                skips += 1
                metrics.write({**row, "skipped": True})  # whatever log_every says
                what = f"the training loss is {_fmt(loss)} and the gradient norm {_fmt(grad_norm)}"
                if cfg.train.on_nonfinite == "stop":
                    raise NonFiniteError(nonfinite_message(
                        step, f"{what}, so the run stopped before applying that update (train.on_nonfinite: stop)",
                        cfg.train, run_dir))
                if skips > cfg.train.max_nonfinite_skips:
                    raise NonFiniteError(nonfinite_message(
                        step, f"{what}: {skips} non-finite steps in this run, more than train.max_nonfinite_skips "
                              f"({cfg.train.max_nonfinite_skips}) allows, so the run stopped", cfg.train, run_dir))
                log.warning("step %d: %s; its update was skipped (%d of train.max_nonfinite_skips %d)", step, what,
                            skips, cfg.train.max_nonfinite_skips)
            elif step % cfg.train.log_every == 0 or step == steps:
                metrics.write(row)
            progress.update(row)
            if eval_set and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == steps):
                eval_result = run_eval(step)
            if sampled and (step % cfg.train.sample_every == 0 or step == steps):
                run_samples(step)
            stopping = cfg.train.stop_after == step and step < steps
            saving = (cfg.train.save_every and step % cfg.train.save_every == 0) or stopping
            if (saving or step == steps) and not weights_finite(trainable, info, device):
                raise NonFiniteError(nonfinite_message(step, "the update of this step made weights NaN or infinite "
                                                       "(its loss and gradient norm were finite)", cfg.train, run_dir))
            if saving:
                state = {"data_position": vars(plan.stream.position), "loss": loss, "nonfinite_skips": skips}
                if info.enabled:
                    save_sharded(run_dir / "checkpoints" / f"step-{step}", model, optimizer, scheduler, state, info,
                                 cfg.train.keep_checkpoints)
                else:
                    save_checkpoint(run_dir, step, model, optimizer, scheduler, state, cfg.train.keep_checkpoints)
            if stopping:
                log.info("stopped at step %d of %d (train.stop_after); continue with --resume", step, steps)
                return TrainResult(run_dir, step, loss, eval_result, None, model)
        metrics.write({"type": "summary", "step": steps, "peak_memory_bytes": peak_memory_bytes(device),
                       "loop_seconds": time.perf_counter() - loop_start, "processes": info.world})
    except KeyboardInterrupt:
        done = list_checkpoints(run_dir)
        raise KeyboardInterrupt(f"interrupted; the newest checkpoint is {done[-1] if done else 'none'}; "
                                "continue with --resume") from None
    finally:
        progress.close()
        metrics.close()
        samples.close()
        logging.getLogger("tunelab").removeHandler(file_log)
        file_log.close()

    # 6. the result, in Hugging Face (or peft) format, consolidated on rank 0
    if info.enabled:
        full = full_state_dict(model)
        final_dir = None
        if info.is_main:
            single = prepare_strategy(load_model(cfg.model, quantize=cfg.strategy.lora), cfg.strategy, tokenizer,
                                      cfg.train.seed)
            load_consolidated(single, full)
            final_dir = save_final(run_dir, single, tokenizer, cfg.model.path, resolve(cfg.strategy).saves)
        barrier()
        final_dir = run_dir / "final"
    else:
        final_dir = save_final(run_dir, model, tokenizer, cfg.model.path, resolve(cfg.strategy).saves)
    log.info("done: %d steps, final train loss %.4f; model in %s", steps, loss, final_dir)
    return TrainResult(run_dir, steps, loss, eval_result, final_dir, model)
