"""The supervised fine-tuning recipe: read top to bottom, it is the whole training run.

Maximise log Pr(target | prompt): the loss is summed over target tokens and divided by the
number of target tokens in the whole optimizer step (all micro-batches), so gradient
accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config, TrainConfig
from tunelab.data.batching import DataPosition, count_label_tokens
from tunelab.data.dataset import load_datasets
from tunelab.data.render import spec_from_config
from tunelab.models.load import enable_activation_checkpointing, load_model, load_tokenizer, pad_token_id
from tunelab.strategies import count_parameters, prepare_strategy
from tunelab.strategies.export import save_final
from tunelab.train.batches import make_batch_plan, total_steps
from tunelab.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.distributed import (DistInfo, all_reduce_sum, barrier, full_state_dict, gradient_sync,
                                       init_distributed, load_sharded, save_sharded, wrap)
from tunelab.train.eval_loss import evaluate_loss
from tunelab.train.loss import causal_lm_loss
from tunelab.train.metrics import MetricsWriter, peak_rss_bytes
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.progress import Progress
from tunelab.train.rundir import check_run_dir, open_run_dir

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
    """The device (this rank's GPU under torchrun), and the autocast dtype (None: full float32)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use train.device: auto or cpu")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device if cfg.device != "auto" else "cpu")
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16
    return device, None


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
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
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


def optimizer_step(model: Any, micro_batches: list[tuple[dict[str, torch.Tensor], int]], scale: float,
                   device: torch.device, autocast: Any, trainable: list[torch.nn.Parameter], max_grad_norm: float | None,
                   optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step: forward and backward over the step's micro-batches (each loss sum times
    `scale`), gradient clipping, the update and the schedule. Returns the summed loss and the gradient
    norm (tensors: the caller decides when the host syncs) and the learning rate used."""
    loss_sum = torch.zeros((), device=device)
    for i, (mb, _) in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with gradient_sync(model, i == len(micro_batches) - 1), autocast():
            out = causal_lm_loss(model, mb)
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, lr


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training run that `cfg` describes; returns where its results are.

    Under torchrun every rank runs this same recipe on its slice of each step.
    """
    # 1. check everything that can be wrong before writing anything: output_dir, device, data, model
    info = init_distributed()
    check_run_dir(cfg)
    seed_everything(cfg.train.seed)
    device, amp_dtype = resolve_device(cfg.train, info)
    set_denormal_mode(cfg.train, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    tokenizer = load_tokenizer(cfg.model)
    train_split, eval_split = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)
    train_set, eval_set = train_split.encoded, eval_split.encoded if eval_split else None
    pad_id = pad_token_id(tokenizer)
    model = load_model(cfg.model, device_type=device.type)

    # 2. the run directory (rank 0 writes; the others follow)
    run_dir = open_run_dir(cfg) if info.is_main else Path(cfg.output_dir)
    barrier()
    file_log = logging.FileHandler(run_dir / (f"train-rank{info.rank}.log" if info.rank else "train.log"))
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("tunelab").addHandler(file_log)
    if not info.is_main:
        logging.getLogger("tunelab").setLevel(logging.WARNING)
    log.info("train data: %s", train_split.stats.summary())

    # 3. strategy: decide what trains and what is added; speed options; data parallelism
    model = prepare_strategy(model, cfg.strategy, tokenizer, cfg.train.seed).to(device)
    model.train()
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model.base)
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda"):
        model.base.get_decoder().compile()  # in place: parameter names (and checkpoints) stay the same
    params = count_parameters(model)
    log.info("strategy %s: %s on %s (%s)%s", cfg.strategy.name, params.summary(), device,
             "bf16 autocast" if amp_dtype else "fp32",
             f", {info.world} processes ({cfg.distributed.strategy})" if info.enabled else "")
    if cfg.strategy.name == "prompting":
        return evaluate_only(cfg, run_dir, model, params, eval_set, pad_id, device, autocast, file_log)
    tm = model
    if info.enabled:
        model = wrap(model, cfg.distributed.strategy, device, amp_dtype is not None)

    # 4. batches, optimizer, schedule; restore all of them when resuming
    plan = make_batch_plan(cfg, train_set, pad_id, can_pack=tm.can_pack, virtual_tokens=tm.virtual_tokens,
                           rank=info.rank, world=info.world)
    steps = total_steps(cfg, plan)
    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    start_step = 0
    checkpoints = list_checkpoints(run_dir) if cfg.resume else []
    if checkpoints:
        if info.enabled:
            state = load_sharded(checkpoints[-1], model, optimizer, scheduler, info)
        else:
            state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        start_step, plan.stream.position = state["step"], DataPosition(**state["data_position"])
        log.info("resumed from %s (step %d)", checkpoints[-1], start_step)
    elif cfg.resume:
        log.info("no complete checkpoint in %s: starting from step 0", run_dir)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_step=start_step if checkpoints else None,
                            enabled=info.is_main)
    if not checkpoints:
        metrics.write({"type": "params", "step": 0, "trainable_params": params.trainable,
                       "total_params": params.total, "trainable_share": params.share})
        st = train_split.stats
        metrics.write({"type": "data", "step": 0, "num_examples": st.num_examples, "num_tokens": st.num_tokens,
                       "num_label_tokens": st.num_label_tokens, "prompts_truncated": st.prompts_truncated,
                       "targets_truncated": st.targets_truncated, "dropped": st.dropped})

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate_loss(model, eval_set, cfg.train.batch_size, pad_id, device, autocast(), tm.virtual_tokens)
        metrics.write({"type": "eval", "step": step, **result})
        log.info("step %d: eval loss %.4f, token accuracy %.3f", step, result["eval_loss"], result["eval_token_accuracy"])
        return result

    eval_result = run_eval(0) if eval_set and cfg.train.eval_every and start_step == 0 else None

    # 5. the loop
    progress = Progress(steps, start_step, enabled=cfg.train.progress and info.is_main)
    loss = float("nan")
    loop_start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
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
            loss_sum, grad_norm, lr = optimizer_step(model, micro_batches, scale, device, autocast, trainable,
                                                     cfg.train.max_grad_norm, optimizer, scheduler)
            if info.enabled:
                loss_sum = torch.tensor(all_reduce_sum(float(loss_sum), device))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            loss, grad_norm = float(loss_sum) / num_label_tokens, float(grad_norm)  # the host syncs once per step
            seconds = time.perf_counter() - t0
            row = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "num_tokens": num_tokens, "num_label_tokens": num_label_tokens,
                   "tokens_per_s": num_tokens / seconds, "epoch": round(plan.stream.epochs_done(), 4), "seconds": seconds,
                   "elapsed_s": time.perf_counter() - loop_start}
            if step % cfg.train.log_every == 0 or step == steps:
                metrics.write(row)
            progress.update(row)
            if eval_set and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == steps):
                eval_result = run_eval(step)
            stopping = cfg.train.stop_after == step and step < steps
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or stopping:
                state = {"data_position": vars(plan.stream.position), "loss": loss}
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
        logging.getLogger("tunelab").removeHandler(file_log)
        file_log.close()

    # 6. the result, in Hugging Face (or peft) format, consolidated on rank 0
    if info.enabled:
        full = full_state_dict(model)
        final_dir = None
        if info.is_main:
            single = prepare_strategy(load_model(cfg.model), cfg.strategy, tokenizer, cfg.train.seed)
            single.load_state_dict(full)
            final_dir = save_final(run_dir, single, tokenizer, cfg.model.path)
        barrier()
        final_dir = run_dir / "final"
    else:
        final_dir = save_final(run_dir, model, tokenizer, cfg.model.path)
    log.info("done: %d steps, final train loss %.4f; model in %s", steps, loss, final_dir)
    return TrainResult(run_dir, steps, loss, eval_result, final_dir, model)
