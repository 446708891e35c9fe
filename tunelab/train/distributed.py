"""Data parallelism through PyTorch's own launcher: torchrun sets the environment, tunelab wraps the
model (FSDP2 `fully_shard` per decoder layer then the root, or DDP), gives each rank its slice of
every step, and checkpoints with torch.distributed.checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("TUNELAB_DEVICE", "auto") != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def check_sharding(strategy: str, quantize: str | None, info: DistInfo) -> None:
    """Refuse, before anything is written, FSDP2 over a bitsandbytes-quantized base: fully_shard turns each weight
    into a plain sharded tensor, and bitsandbytes' 4-bit weight (Params4bit) keeps its block scales beside the
    packed codes, where the gathered shard no longer finds them (bitsandbytes 0.50's forward then fails its own
    shape check); peft's FSDP recipe (bnb_4bit_quant_storage) is for FSDP1's flat parameters, which FSDP2 does not
    have. DDP keeps every weight whole on every rank and trains a quantized base as one process does."""
    if info.enabled and quantize is not None and strategy == "fsdp2":
        from tunelab.errors import ConfigError

        raise ConfigError(f"strategy.lora.quantize is {quantize} and distributed.strategy is fsdp2 on {info.world} "
                          "processes, but FSDP2 cannot shard a bitsandbytes-quantized base correctly: fully_shard "
                          "replaces each 4-bit weight with a plain sharded tensor that has lost its block scales. "
                          "Use distributed.strategy: ddp (each process holds the whole 4-bit base, which is what "
                          "quantizing it made small), or train unquantized under fsdp2.")


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: Any, strategy: str, device: torch.device, bf16: bool) -> Any:
    """FSDP2 (shard each decoder layer, then the root) or DDP. The TrainModel's forward holds the whole
    loss, so the root's parameters (embeddings, head) are gathered for exactly that call."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tunelab.models.layers import decoder_layers

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model.base):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def reshard(model: Any) -> None:
    """After a forward without backward (evaluation), put an FSDP2 model's root back to its sharded parameters.

    FSDP2 keeps the root's parameters gathered after a forward, for the backward it expects; without one they
    stay gathered (memory) and the module lists the gathered copies instead of its parameters. No-op for
    DDP and one process."""
    if not dist.is_initialized():
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


@contextlib.contextmanager
def gradient_sync(model: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    yield


def _options(full: bool = False) -> Any:
    """Checkpoints hold the trained parameters only (the frozen ones are the base model's, loaded from its files),
    so loading one into the model leaves its frozen parameters as they are (strict only for the full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=not full, full_state_dict=full, cpu_offload=full, strict=full)


def save_sharded(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], info: DistInfo,
                 keep: int) -> Path:
    """Every rank writes its shard into a temporary folder; rank 0 renames it once all are done."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tunelab.train.checkpoint import list_checkpoints, rng_state

    tmp = path.parent / f".tmp-{path.name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-{info.rank}.pt")
    if info.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": int(path.name.split("-")[1]), "world": info.world,
                                                             **state}, indent=2))
    barrier()
    if info.is_main:
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return path


def load_sharded(path: Path, model: Any, optimizer: Any, scheduler: Any, info: DistInfo) -> dict[str, Any]:
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from tunelab.errors import ConfigError
    from tunelab.train.checkpoint import set_rng_state

    meta = json.loads((path / "trainer_state.json").read_text())
    if meta.get("world") != info.world:
        raise ConfigError(f"checkpoint '{path}' was written by {meta.get('world', 1)} processes; resume it with the "
                          f"same number (this run has {info.world}).")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{info.rank}.pt", weights_only=True))
    return meta


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The whole model, gathered to CPU tensors (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full=True))


def load_consolidated(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy the gathered trained parameters of `full_state_dict` into a one-process copy of the model. Its frozen
    weights are the base model's, loaded from the same files: a quantized base's codes and block scales among
    them, which bitsandbytes' layers do not take back through load_state_dict."""
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in trained if n not in state]
    assert not missing, f"trained parameters absent from the gathered state: {missing[:3]}"
    with torch.no_grad():
        for name in trained:
            params[name].copy_(state[name])


def torchrun_failure(stderr_tail: str, exit_code: int) -> str:
    """The sentence for a torchrun job that failed: which rank failed and by which signal, read from torchrun's own
    report of the first failure ("Root Cause") in the end of its standard error."""
    root = stderr_tail.split("Root Cause", 1)[-1]
    rank = re.search(r"rank: (\d+)", root) or re.search(r"error \(rank (\d+)\)", stderr_tail)
    signal = re.search(r"Signal \d+ \((\w+)\)", root)
    why = f" ({signal.group(1)})" if signal else ""
    who = f"rank {rank.group(1)}" if rank else "a training process"
    return (f"{who} failed{why}, so torchrun stopped the whole job (exit code {exit_code}); the messages above say "
            "why. Continue from the last checkpoint with --resume.")


def launch_torchrun(tunelab_args: list[str], nproc: int) -> None:
    """Run `tunelab TUNELAB_ARGS` under torchrun, one process per device, passing its output through; a failed job
    raises TunelabError naming the rank that failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunelab", *tunelab_args]
    proc = subprocess.Popen(cmd, stdout=None, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    for line in proc.stderr:  # pass everything through, keep the end for the failure report
        sys.stderr.write(line)
        tail = (tail + [line])[-200:]
    code = proc.wait()
    if code != 0:
        raise TunelabError(torchrun_failure("".join(tail), code))
