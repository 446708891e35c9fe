"""`--format vllm`: a run's final/ in the layout vLLM serves, checked against what vLLM's LoRA loads.

vLLM serves a LoRA adapter over its base (`vllm serve BASE --enable-lora --lora-modules NAME=DIR`) when the adapter
is peft's LoRA layout (adapter_config.json + adapter_model.safetensors), of plain LoRA (no DoRA weight
magnitudes, no trained biases, no fully trained modules_to_save), on linear layers its model of the family
applies LoRA to, at a rank it is built for (--max-lora-rank; 16 by default). A full run is a Hugging Face folder
that vLLM serves as is. vLLM itself does not run on this CPU: this checks the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.families import family_of
from tunelab.export.source import RunSource, read_run
from tunelab.runfiles import FINAL_BASE

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16


def _refuse(source: RunSource, why: str) -> TunelabError:
    return TunelabError(f"'{source.final}' cannot be served by vLLM as a LoRA adapter: {why}. Nothing was written. "
                        "Export merged weights instead (tunelab export RUN_DIR OUT --merge), which vLLM serves as a "
                        "plain model.")


def check_lora_for_vllm(source: RunSource) -> list[str]:
    """The adapter's target modules, after checking everything vLLM's LoRA loader requires of it."""
    adapter = source.adapter_config or {}
    family = family_of(source.architecture, str(source.final))
    if adapter.get("peft_type") != "LORA":
        raise _refuse(source, f"it is a {adapter.get('peft_type')} adapter, and vLLM loads LoRA adapters only")
    if adapter.get("use_dora"):
        raise _refuse(source, "it is a DoRA adapter (use_dora), and vLLM's LoRA has no weight-magnitude vectors")
    if adapter.get("bias", "none") != "none":
        raise _refuse(source, f"it trains biases (bias: {adapter['bias']}), which vLLM's LoRA does not load")
    if adapter.get("modules_to_save"):
        raise _refuse(source, f"it fully trains {adapter['modules_to_save']} (modules_to_save), which vLLM does not "
                              "load from an adapter")
    if not family.vllm_lora_modules:
        raise _refuse(source, f"vLLM has no LoRA support for {family.name} models (its model class does not take "
                              "adapters); merge the adapter instead (tunelab export RUN_DIR OUT --merge) and serve the "
                              "merged folder")
    targets = adapter.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    unsupported = [t for t in targets if t.split(".")[-1] not in family.vllm_lora_modules]
    if unsupported:
        raise _refuse(source, f"it adapts {unsupported}, and vLLM applies LoRA to {list(family.vllm_lora_modules)} "
                              f"on {family.name} models")
    if not (source.final / "adapter_model.safetensors").is_file():
        raise _refuse(source, "it has no adapter_model.safetensors (vLLM reads safetensors weights)")
    if adapter.get("r", 8) not in VLLM_LORA_RANKS:
        raise _refuse(source, f"its rank r={adapter.get('r')} is not one vLLM is built for ({VLLM_LORA_RANKS})")
    return targets


def serve_command(source: RunSource, out_dir: Path, name: str) -> str:
    adapter = source.adapter_config
    if adapter is None:
        return f"vllm serve {out_dir.resolve()}"
    rank = adapter.get("r", 8)
    extra = f" --max-lora-rank {rank}" if rank > DEFAULT_MAX_LORA_RANK else ""
    return (f"vllm serve {adapter['base_model_name_or_path']} --enable-lora --lora-modules "
            f"{name}={out_dir.resolve()}{extra}")


def export_vllm(run_dir: Path, out_dir: Path, overwrite: bool = False) -> str:
    """Copy final/ (an adapter checked for vLLM, or a full model) to OUT; returns the `vllm serve` command."""
    from tunelab.export.gguf import check_output
    from tunelab.train.checkpoint import atomic_dir

    source = read_run(run_dir)
    if (source.final / FINAL_BASE).is_dir():
        raise _refuse(source, "it is a soft prompt over a tuned base (prompt+LM tuning), and vLLM serves no soft "
                              "prompts")
    if source.adapter_config is not None:
        check_lora_for_vllm(source)
    else:
        family_of(source.architecture, str(source.final))
    check_output(Path(out_dir), overwrite)
    atomic_dir(Path(out_dir), lambda tmp: shutil.copytree(source.final, tmp, dirs_exist_ok=True))
    return serve_command(source, Path(out_dir), Path(run_dir).resolve().name)
