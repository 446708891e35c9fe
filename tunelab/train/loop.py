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
from tunelab.data.render import RenderSpec
from tunelab.models.load import load_model, load_tokenizer, pad_token_id
from tunelab.strategies import apply_strategy, count_parameters
from tunelab.train.batches import make_batch_plan, total_steps
from tunelab.train.checkpoint import atomic_dir, list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.eval_loss import evaluate_loss
from tunelab.train.loss import causal_lm_loss
from tunelab.train.metrics import MetricsWriter
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
    final_dir: Path


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: full float32)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use train.device: auto or cpu")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device if cfg.device != "auto" else "cpu")
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16
    return device, None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def render_spec(cfg: Config) -> RenderSpec:
    return RenderSpec(mode=cfg.data.render, template=cfg.strategy.template, num_shots=cfg.strategy.num_shots,
                      seed=cfg.train.seed, last_turn_only=cfg.data.last_turn_only, chat_template=cfg.data.chat_template)


def save_final(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """final/: a Hugging Face folder that plain `from_pretrained` loads (written atomically)."""
    def write(tmp: Path) -> None:
        model.config.use_cache = True
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.config.use_cache = False

    return atomic_dir(run_dir / "final", write)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training run that `cfg` describes; returns where its results are."""
    # 1. check everything that can be wrong before writing anything: output_dir, device, data, model
    check_run_dir(cfg)
    seed_everything(cfg.train.seed)
    device, amp_dtype = resolve_device(cfg.train)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    tokenizer = load_tokenizer(cfg.model)
    train_split, eval_split = load_datasets(cfg.data, render_spec(cfg), tokenizer, cfg.train.seed)
    train_set, eval_set = train_split.encoded, eval_split.encoded if eval_split else None
    pad_id = pad_token_id(tokenizer)
    model = load_model(cfg.model, device_type=device.type)

    # 2. the run directory
    run_dir = open_run_dir(cfg)
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("tunelab").addHandler(file_log)
    log.info("train data: %s", train_split.stats.summary())

    # 3. strategy: decide what trains; speed options
    model = apply_strategy(model, cfg.strategy).to(device)
    model.train()
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda"):
        model.get_decoder().compile()  # in place: parameter names (and checkpoints) stay the same
    params = count_parameters(model)
    log.info("%s on %s (%s)", params.summary(), device, "bf16 autocast" if amp_dtype else "fp32")

    # 4. batches, optimizer, schedule; restore all of them when resuming
    plan = make_batch_plan(cfg, train_set, pad_id)
    steps = total_steps(cfg, plan)
    optimizer = build_optimizer(model, cfg.train, device)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    start_step = 0
    checkpoints = list_checkpoints(run_dir) if cfg.resume else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        start_step, plan.stream.position = state["step"], DataPosition(**state["data_position"])
        log.info("resumed from %s (step %d)", checkpoints[-1], start_step)
    elif cfg.resume:
        log.info("no complete checkpoint in %s: starting from step 0", run_dir)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_step=start_step if checkpoints else None)
    if not checkpoints:
        metrics.write({"type": "params", "step": 0, "trainable_params": params.trainable,
                       "total_params": params.total, "trainable_share": params.share})

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate_loss(model, eval_set, cfg.train.batch_size, pad_id, device, autocast())
        metrics.write({"type": "eval", "step": step, **result})
        log.info("step %d: eval loss %.4f, token accuracy %.3f", step, result["eval_loss"], result["eval_token_accuracy"])
        return result

    eval_result = run_eval(0) if eval_set and cfg.train.eval_every and start_step == 0 else None

    # 5. the loop
    progress = Progress(steps, start_step, enabled=cfg.train.progress)
    loss = float("nan")
    loop_start = time.perf_counter()
    try:
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            micro_batches = plan.next_step()
            num_label_tokens = sum(count_label_tokens(mb["labels"]) for mb, _ in micro_batches)
            num_tokens = sum(n for _, n in micro_batches)
            loss_sum = torch.zeros((), device=device)
            for mb, _ in micro_batches:
                mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
                with autocast():
                    out = causal_lm_loss(model, mb)
                (out.loss_sum / num_label_tokens).backward()
                loss_sum += out.loss_sum.detach()
            max_norm = cfg.train.max_grad_norm or float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                state = {"data_position": vars(plan.stream.position), "loss": loss}
                save_checkpoint(run_dir, step, model, optimizer, scheduler, state, cfg.train.keep_checkpoints)
    except KeyboardInterrupt:
        done = list_checkpoints(run_dir)
        raise KeyboardInterrupt(f"interrupted; the newest checkpoint is {done[-1] if done else 'none'}; "
                                "continue with --resume") from None
    finally:
        progress.close()
        metrics.close()
        logging.getLogger("tunelab").removeHandler(file_log)
        file_log.close()

    # 6. the result, in Hugging Face format
    final_dir = save_final(run_dir, model, tokenizer)
    log.info("done: %d steps, final train loss %.4f; model in %s", steps, loss, final_dir)
    return TrainResult(run_dir, steps, loss, eval_result, final_dir)
