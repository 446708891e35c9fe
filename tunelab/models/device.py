"""The device decision, made once and used by every command that runs a model (train, eval, diff, compare,
chat, generate): CUDA when it is available unless configured otherwise, bf16 autocast where the
device supports it, this rank's GPU under torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.errors import ConfigError


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32

    def autocast(self) -> Any:
        """The autocast context of this choice (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def choose_device(setting: str = "auto", precision: str = "auto", local_rank: int | None = None,
                  key: str = "device") -> DeviceChoice:
    """`setting`: auto (CUDA when available, else the CPU), cuda or cpu; `precision`: auto (bf16 autocast on a GPU
    that has it, else fp32), bf16 or fp32; `local_rank`: this process's GPU under torchrun; `key`: the setting's
    name in errors."""
    if setting not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"{key} is '{setting}': use auto (a GPU when there is one), cuda or cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is 'cuda' but no CUDA device is available; use {key}: auto or cpu")
    kind = "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(kind, local_rank) if kind == "cuda" and local_rank is not None else torch.device(kind)
    bf16 = precision == "bf16" or (precision == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported())
    return DeviceChoice(device, torch.bfloat16 if bf16 else None)


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (Linux's CPU flags), where `precision: bf16` trains
    much faster than float32 on the CPU: its matrix products ran 7x faster on this project's CPU, and SmolLM2-135M
    trained 1.31x (LoRA) and 1.62x (full) faster (BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch moved to the device, without waiting for the copy where the device allows it."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
