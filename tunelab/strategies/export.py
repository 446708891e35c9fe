"""What a run leaves in final/, in the formats the rest of the ecosystem loads, and `tunelab export`.

By the strategy's `saves` (tunelab/strategies/registry.py):
- model (full, freeze, fixed_prompt with all weights): a Hugging Face checkpoint.
- adapter (lora, fixed_prompt with LoRA, soft_prompt): a peft adapter folder (adapter_config.json,
  adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the base model.
- model+adapter (prompt_lm): final/base (the tuned LM, a Hugging Face checkpoint) and final/adapter
  (the soft prompt, whose adapter_config.json points at final/base).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir, remove_stale_temp
from tunelab.errors import TunelabError
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import loaded_addition, mergeable_peft_types


def _save_hf(model: Any, tokenizer: Any, out: Path) -> None:
    use_cache = model.config.use_cache
    model.config.use_cache = True  # generation wants the KV cache; training had turned it off
    # the tokenizer's EOS first, then every other end id the model's generation config has (an instruct model's
    # end-of-turn tokens, such as Llama 3's <|eot_id|> or a converted GGUF's <|endoftext|>): keep them all
    config_ends = model.generation_config.eos_token_id
    config_ends = config_ends if isinstance(config_ends, list) else [config_ends]
    ends = [i for i in dict.fromkeys([tokenizer.eos_token_id, *config_ends]) if i is not None]
    model.generation_config.eos_token_id = ends if len(ends) > 1 else ends[0] if ends else None
    model.save_pretrained(out)
    model.config.use_cache = use_cache
    tokenizer.save_pretrained(out)


def save_final(run_dir: Path, model: TrainModel, tokenizer: Any, base_path: str, saves: str) -> Path:
    """Write final/ atomically in the format the strategy `saves` (see the module docstring); first remove
    what a killed writer of final/ left in the run directory."""
    final = Path(run_dir) / "final"
    remove_stale_temp(Path(run_dir))

    def write(tmp: Path) -> None:
        if saves == "model":
            _save_hf(model.lm, tokenizer, tmp)
            return
        addition = loaded_addition(model.lm)
        if saves == "model+adapter":
            _save_hf(model.base, tokenizer, tmp / "base")
            addition.save(model.lm, tokenizer, tmp / "adapter", str((final / "base").resolve()))
        else:
            addition.save(model.lm, tokenizer, tmp,
                          str(Path(base_path).resolve()) if Path(base_path).exists() else base_path)

    return atomic_dir(final, write)


def load_final(final: Path) -> Any:
    """Load final/ (any strategy) with plain transformers and peft, as a user would, in float32: the precision
    training keeps its weights in (transformers' default, the config's dtype, would load a bf16-saved base in bf16
    under an adapter trained over float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.load import check_weights, read_adapter_config

    final = Path(final)
    for folder in (final, final / "base", final / "adapter"):  # a damaged file is named, not a SafetensorError
        check_weights(folder)
        if (folder / "adapter_config.json").is_file():
            read_adapter_config(folder)
    if (final / "adapter" / "adapter_config.json").is_file():  # prompt_lm
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "base", dtype=torch.float32),
                                         final / "adapter")
    if (final / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(_load_base_of(final), final)
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)


def _load_base_of(adapter_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.load import check_weights, read_adapter_config

    base = read_adapter_config(adapter_dir)["base_model_name_or_path"]
    check_weights(base)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def export_run(run_dir: Path, out_dir: Path, merge: bool) -> str:
    """Copy (or, with merge, fold LoRA into the weights of) a run's final/ into a standalone folder."""
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise TunelabError(f"'{run_dir}' has no final/ folder: it is not a finished tunelab run "
                           "(tuning-free prompting has nothing to export).")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TunelabError(f"'{out_dir}' is not empty; choose a new folder for the export.")
    adapter = final / "adapter_config.json"
    if not merge or not (adapter.is_file() or (final / "adapter").is_dir()):
        shutil.copytree(final, out_dir, dirs_exist_ok=True)
        return "copied final/ (nothing to merge)" if merge else "copied final/"
    from transformers import AutoTokenizer

    from tunelab.models.load import read_adapter_config

    peft_type = read_adapter_config(final if adapter.is_file() else final / "adapter")["peft_type"]
    if peft_type not in mergeable_peft_types():
        shutil.copytree(final, out_dir, dirs_exist_ok=True)
        return (f"a {peft_type.lower().replace('_', ' ')} adapter cannot be merged: its learned prompt is extra input "
                "(virtual tokens or prefix keys and values) computed at every call, not a change to any weight, so "
                "there is no weight to fold it into. The adapter was exported as is; load it with "
                "peft.PeftModel.from_pretrained onto the base model.")
    merged = load_final(final).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(final)
    atomic_dir(out_dir, lambda tmp: _save_hf(merged, tokenizer, tmp))
    return "merged the LoRA adapter into a standalone Hugging Face checkpoint"
