"""Peak figures of the devices `tunelab plan` knows, with their sources, and the CPU measured on the spot."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.atomic import atomic_write_text
from tunelab.errors import DiskFullError


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    peak_flops: float  # dense, in the training precision
    mfu: float  # the model-FLOPs utilisation the time estimate assumes
    source: str
    memory_bandwidth: float = 0.0  # bytes/s: what memory-bound work (dequantizing a 4-bit base) runs at


DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM 80GB", 80e9, 989e12, 0.35,
                   "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOPS dense BF16 (SXM5); MFU 35% is typical of "
                   "well-tuned small-model SFT (the reference 787 TFLOP/s matmul is 80% of peak); 3.35 TB/s HBM3",
                   3.35e12),
    "a100": Device("NVIDIA A100 SXM 80GB", 80e9, 312e12, 0.40,
                   "NVIDIA A100 datasheet: 312 TFLOPS dense BF16; MFU 40% (Megatron-LM reports 40-50% at scale); "
                   "2,039 GB/s HBM2e", 2.039e12),
    "l4": Device("NVIDIA L4 24GB", 24e9, 121e12, 0.35,
                 "NVIDIA L4 datasheet: 121 TFLOPS dense BF16 (242 with sparsity); MFU 35%; 300 GB/s GDDR6", 300e9),
}


BUSY_LIMIT = 1.5  # a probe whose median call took 1.5x its fastest ran beside other work


@dataclass(frozen=True)
class Timing:
    best: float  # the fastest call: other work on the machine can only slow a call down
    busy: float  # the median call over the fastest: near 1 on an idle machine


def _time_calls(fn: Callable[[], object], seconds: float, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """fn()'s fastest call over about `seconds` (at least 5 calls, after three warm-up calls), and how much slower
    its median call was. The mean, which this probe used to take, is dragged down by whatever else runs: measured
    beside another job it read 11.2 GFLOP/s where the idle machine gives 45.6 (issue 30)."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = clock()
    while len(times) < 5 or clock() - start < seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    best = max(min(times), 1e-9)
    return Timing(best, sorted(times)[len(times) // 2] / best)


@functools.cache  # measured once per process: a second plan (compare, several --gpu) reuses it
def cpu_device() -> Device:
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    matmul = _time_calls(lambda: a @ b, 0.3)
    source, target = torch.ones(2**24), torch.empty(2**24)  # 64 MiB each: beyond the caches
    copy = _time_calls(lambda: target.copy_(source), 0.1)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    busy = max(matmul.busy, copy.busy)
    caveat = (f"; the machine was busy while it was probed (the median call took {busy:.1f}x the fastest): the "
              "fastest calls count, but CPU times are unreliable until it is idle" if busy >= BUSY_LIMIT else "")
    return Device(f"this CPU ({torch.get_num_threads()} threads)", float(pages), 2 * 512**3 / matmul.best, 1.0,
                  "fp32 matmul rate measured by tunelab plan on this machine (the fastest of 512^3 products over "
                  "0.3 s); with --measure step times are not derived from it but measured: real steps of cut copies "
                  "of the model; memory bandwidth from 64 MiB copies over 0.1 s" + caveat,
                  2 * source.numel() * 4 / copy.best)  # read + write


# What a running CPU training process holds beyond its imports and its per-token buffers (the tokenizer, the
# data, thread pools): fitted with plan.estimate's CPU_BYTES_PER_TOKEN, see there and BENCHMARKS.md.
CPU_RUNNING_EXTRA_BYTES = 8 * 2**20


_RUNTIME: dict[str, float] = {}  # the measurement, once per process that plans


def _runtime_cache() -> tuple[Path, str]:
    """Where the measurement is kept between plans, and the key it is valid for (the interpreter and the versions
    of the stack it imports)."""
    import importlib.metadata as md
    import sys

    versions = [f"{n} {md.version(n)}" for n in ("torch", "transformers", "peft")]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"
    return root / "runtime_bytes.json", "; ".join([sys.executable, sys.version.split()[0], *versions])


class RuntimeProbe:
    """Resident memory of a training process before its model and activations: the peak of a fresh process that
    has imported tunelab's training stack (Python, torch, transformers, peft), plus CPU_RUNNING_EXTRA_BYTES.
    Measured in a child process started now, so that it runs while the plan reads the model's shape and the data,
    and kept in the user's cache for the same interpreter and versions (a later plan starts no child)."""

    CODE = "import torch, transformers, peft, tunelab.train.loop, tunelab.train.metrics as m; print(m.peak_rss_bytes())"

    def __init__(self) -> None:
        import json
        import subprocess
        import sys

        self.proc = None
        self.path, self.key = _runtime_cache()
        if not _RUNTIME:
            try:
                cached = json.loads(self.path.read_text()) if self.path.is_file() else {}
            except (OSError, ValueError):
                cached = {}
            if isinstance(cached.get(self.key), (int, float)):
                _RUNTIME["imported"] = float(cached[self.key])
        if not _RUNTIME:
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)

    def bytes(self) -> float:
        if self.proc is not None and not _RUNTIME:
            out, _ = self.proc.communicate(timeout=120)
            lines = out.strip().splitlines()
            if self.proc.returncode == 0 and lines:
                _RUNTIME["imported"] = float(lines[-1])
                self._keep(_RUNTIME["imported"])
        return _RUNTIME.get("imported", 0.0) + CPU_RUNNING_EXTRA_BYTES

    def _keep(self, value: float) -> None:
        import json

        try:  # a cache that cannot be written costs the next plan a few seconds, nothing else
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({self.key: value}))
        except (OSError, DiskFullError):
            pass


def get_device(name: str) -> Device:
    if name == "cpu":
        return cpu_device()
    if name not in DEVICES:
        from tunelab.errors import ConfigError

        raise ConfigError(f"unknown --gpu '{name}'; choose from {', '.join([*DEVICES, 'cpu'])}.")
    return DEVICES[name]
