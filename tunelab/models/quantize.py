"""A quantized base model through bitsandbytes: its `BitsAndBytesConfig`, a quiet import, what it needs, and the
dequantized weights a quantized layer computes with.

`strategy.lora.quantize` loads the frozen base in 4-bit (nf4 or fp4 codes, a float scale per 64-weight block, with
double quantization the scales themselves 8-bit) or 8-bit (LLM.int8) through transformers' own path
(`from_pretrained(quantization_config=...)`); the adapter on top trains in `compute_dtype`. bitsandbytes 0.50 runs
all three on the CPU with its own kernels; at import it would look for a faster CPU kernel on the Hugging Face Hub
(kernels-community/quantization-bitsandbytes), which tunelab never fetches: `import_bitsandbytes` keeps that
lookup from starting (whoever imports bitsandbytes first: peft does, on its own import) and says so in the debug log.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import logging
import sys
from collections.abc import Iterator
from typing import Any

from tunelab.errors import ConfigError

QUANT_BLOCK = 64  # weights per 4-bit block scale, as transformers' BitsAndBytesConfig quantizes

log = logging.getLogger(__name__)
_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
_INT8_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"


class _DropMessages(logging.Filter):
    """Drops log records that start with one of `prefixes` (bitsandbytes' notices that tunelab handles itself)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _no_hub_kernels() -> Iterator[None]:
    """While bitsandbytes imports, `from kernels import get_kernel` fails (as it does where `kernels` is not
    installed), so bitsandbytes takes its own CPU kernel at once instead of asking the Hub for one."""
    kernels = sys.modules.get("kernels", ...)
    if kernels is not ... and kernels is not None:
        from unittest import mock

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ImportError("tunelab does not fetch hub kernels for bitsandbytes")

        with mock.patch.object(kernels, "get_kernel", refuse):
            yield
        return
    sys.modules["kernels"] = None  # type: ignore[assignment]  # import kernels -> ImportError
    try:
        yield
    finally:
        if kernels is ...:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = kernels


def _quietly(exec_module: Any) -> Any:
    """A loader's exec_module for bitsandbytes that runs without a hub lookup and without the notices that do not
    concern a user: the hub-kernel one (its own CPU kernel serves instead) and LLM.int8's per-call note that
    float32 inputs are cast to float16 (that cast is what int8 matmul is)."""

    def run(module: Any) -> None:
        ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        quiet = _DropMessages(_HUB_KERNEL_WARNING)
        ops_log.addFilter(quiet)
        try:
            with _no_hub_kernels():
                exec_module(module)
        finally:
            ops_log.removeFilter(quiet)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropMessages(_INT8_CAST_WARNING))
        log.debug("bitsandbytes imported with its own CPU kernels (no hub kernel fetched)")

    return run


class QuietBitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do, and has it import `_quietly`: whoever imports it first (peft
    does, on its own import), it never asks the Hub for a kernel. Installed by `tunelab/__init__.py`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "bitsandbytes":
            return None
        others = [f for f in sys.meta_path if not isinstance(f, QuietBitsandbytesFinder)]
        for finder in others:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader.exec_module = _quietly(spec.loader.exec_module)  # this spec's loader only
                return spec
        return None


def install_quiet_import() -> None:
    """Make every later import of bitsandbytes in this process quiet and hub-free (idempotent)."""
    if not any(isinstance(f, QuietBitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietBitsandbytesFinder())


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported quietly and without a hub lookup (`QuietBitsandbytesFinder`); a ConfigError naming
    what to install where it is missing."""
    from tunelab.config import BITSANDBYTES_NEEDED, bitsandbytes_installed

    if not bitsandbytes_installed():
        raise ConfigError(BITSANDBYTES_NEEDED + ".")
    install_quiet_import()
    import bitsandbytes

    return bitsandbytes


def compute_dtype(requested: str, device_type: str) -> Any:
    """The dtype a quantized layer dequantizes to and multiplies in: auto is bfloat16 on a GPU (what bf16 training
    computes in), float32 on the CPU (where tunelab trains in float32)."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, requested)


def bitsandbytes_config(quantize: str, double_quant: bool, dtype: str, device_type: str,
                        storage_dtype: Any = None) -> Any:
    """transformers' `BitsAndBytesConfig` for `strategy.lora.quantize` (nf4, fp4 or int8). `storage_dtype` packs
    4-bit codes into a float dtype's storage (bnb_4bit_quant_storage), which FSDP needs to shard them."""
    import torch
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(dtype, device_type),
                              bnb_4bit_quant_storage=storage_dtype or torch.uint8)


def is_quantized(model: Any) -> bool:
    """The model was loaded with bitsandbytes quantization (4-bit or 8-bit)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def quantized_layers(model: Any) -> dict[str, Any]:
    """The model's quantized layers by module name: bitsandbytes' linear layers (Linear4bit, Linear8bitLt) and,
    with strategy.lora.quantize_embeddings, the token embedding and output head (`Dequantized4bit` weights)."""
    if not is_quantized(model):
        return {}
    bnb = import_bitsandbytes()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or _dequantized_4bit(m) is not None}


@functools.cache
def dequantized_4bit_class() -> type:
    """The parametrization of a weight stored as 4-bit codes (torch.nn.utils.parametrize), built on first use (it
    needs torch and bitsandbytes): the module keeps the packed codes (two to a byte, frozen; the state holds the
    shape and follows the codes to another device) and reads `weight` as codes times block scales in the compute
    dtype. Unlike bitsandbytes' Embedding4bit it
    works with double quantization and in any embedding class (Gemma's scaled one too), and one set of codes
    serves a tied embedding and head."""
    import torch

    bnb = import_bitsandbytes()

    class Dequantized4bit(torch.nn.Module):
        def __init__(self, state: Any, dtype: Any) -> None:
            super().__init__()
            self.state, self.dtype = state, dtype

        def forward(self, codes: Any) -> Any:
            if self.state.absmax.device != codes.device:  # moved with the model (.to(device)): the state follows
                self.state.to(codes.device)
            return bnb.functional.dequantize_4bit(codes, self.state).to(self.dtype)

    return Dequantized4bit


def _dequantized_4bit(module: Any) -> Any:
    """A module's Dequantized4bit weight parametrization, or None."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, dequantized_4bit_class())), None)


def quantize_embeddings(model: Any, settings: Any, device_type: str) -> Any:
    """strategy.lora.quantize_embeddings: the token embedding and the output head stored as 4-bit codes like the
    decoder's layers (`settings.quantize`, block size 64, `double_quant`), dequantized on each use; a tied head
    shares the embedding's codes. QLoRA keeps both in 16 bits; where the vocabulary is a large share of a small
    model (SmolLM2-135M: 21% of its parameters) they are most of what is left of the base."""
    import torch
    from torch.nn.utils import parametrize

    bnb = import_bitsandbytes()
    dtype = compute_dtype(settings.compute_dtype, device_type)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    done: dict[int, tuple[Any, Any]] = {}
    for module in [embed] + ([head] if head is not None else []):
        weight = module.weight
        if id(weight) not in done:
            packed, state = bnb.functional.quantize_4bit(weight.data, blocksize=QUANT_BLOCK,
                                                         compress_statistics=settings.double_quant,
                                                         quant_type=settings.quantize)
            done[id(weight)] = (torch.nn.Parameter(packed, requires_grad=False), state)  # the state holds the shape
        codes, state = done[id(weight)]
        del module.weight
        module.weight = codes  # a tied head is given the same codes Parameter, and so shares them
        parametrize.register_parametrization(module, "weight", dequantized_4bit_class()(state, dtype), unsafe=True)
    log.debug("token embedding%s stored in 4 bits", " and tied head" if tied else " and output head")
    return model


def quantized_as_configured(model: Any, settings: Any, device_type: str) -> Any:
    """A model bitsandbytes has just loaded quantized, finished as strategy.lora asks: its embeddings quantized
    too where quantize_embeddings is set, and every 4-bit layer computing as in training."""
    if settings.quantize_embeddings:
        quantize_embeddings(model, settings, device_type)
    return compute_as_in_training(model)


def compute_as_in_training(model: Any) -> Any:
    """Make every 4-bit layer compute in evaluation as it does in training: dequantize, then multiply in its compute
    dtype. On a CPU with AVX512-BF16, bitsandbytes' Linear4bit otherwise repacks its codes in place at the first
    forward without gradients and multiplies in bfloat16 there, which fails outright for a layer whose output width
    is not a multiple of 32 (stories260K's MLP is 172 wide) and gives eval losses at another precision than the
    training losses they are compared with."""
    for layer in quantized_layers(model).values():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def loaded_bytes(model: Any) -> int:
    """The memory of a loaded model: transformers' get_memory_footprint (parameters and buffers) plus what it does
    not see of a quantized layer, the state kept beside its codes (a 4-bit layer's block scales, their own scales
    with double quantization and the code tables; an 8-bit layer's row scales)."""
    import torch

    extra = 0
    seen: set[int] = set()
    for layer in quantized_layers(model).values():
        parametrization = _dequantized_4bit(layer)
        state = parametrization.state if parametrization is not None else getattr(layer.weight, "quant_state", None)
        if state is not None and id(state) not in seen:  # a tied head shares its embedding's state
            seen.add(id(state))
            extra += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                         if isinstance(t, torch.Tensor))
        row_scales = getattr(layer.weight, "SCB", None)  # LLM.int8's per-row scales
        if isinstance(row_scales, torch.Tensor):
            extra += row_scales.numel() * row_scales.element_size()
    return int(model.get_memory_footprint()) + extra


def dequantized_weight(layer: Any) -> Any:
    """The float weight (out, in) a quantized layer computes with: its codes times its block scales."""
    bnb = import_bitsandbytes()
    if _dequantized_4bit(layer) is not None:
        return layer.weight.detach().float()
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return (w.data.float() * w.SCB.float()[:, None] / 127.0)  # LLM.int8: row-wise absmax scales


def save_dequantized_copy(quantized: Any, source: Any, out: Any) -> Any:
    """The model of folder `source` with each quantized layer's weight replaced by what that layer of `quantized`
    computes with (codes times scales), saved to `out` with source's tokenizer files: the unquantized model that a
    run over the quantized base must match."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            modules[name].weight.copy_(dequantized_weight(layer))
    model.save_pretrained(out)
    for f in Path(source).glob("*token*"):
        shutil.copy(f, Path(out) / f.name)
    return Path(out)
