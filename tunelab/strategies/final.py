"""What a run leaves in final/, in the formats the rest of the ecosystem loads (`tunelab export` lives in
tunelab/export/).

By the strategy's `saves` (tunelab/strategies/registry.py):
- model (full, freeze, fixed_prompt with all weights): a Hugging Face checkpoint.
- adapter (lora, fixed_prompt with LoRA, soft_prompt): a peft adapter folder (adapter_config.json,
  adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the base model.
- model+adapter (prompt_lm): final/base (the tuned LM, a Hugging Face checkpoint) and final/adapter
  (the soft prompt, whose adapter_config.json points at final/base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir, remove_stale_temp
from tunelab.strategies.model import TrainModel
from tunelab.strategies.registry import loaded_addition


def save_hf(model: Any, tokenizer: Any, out: Path) -> None:
    """A Hugging Face checkpoint of `model` and its tokenizer, ready to generate (KV cache on, every end id kept)."""
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
            save_hf(model.lm, tokenizer, tmp)
            return
        addition = loaded_addition(model.lm)
        if saves == "model+adapter":
            save_hf(model.base, tokenizer, tmp / "base")
            addition.save(model.lm, tokenizer, tmp / "adapter", str((final / "base").resolve()))
        else:
            addition.save(model.lm, tokenizer, tmp,
                          str(Path(base_path).resolve()) if Path(base_path).exists() else base_path)

    return atomic_dir(final, write)


def load_final(final: Path, quantized: Any = None) -> Any:
    """Load final/ (any strategy) with plain transformers and peft, as a user would, in float32: the precision
    training keeps its weights in (transformers' default, the config's dtype, would load a bf16-saved base in bf16
    under an adapter trained over float32). `quantized`: the run's strategy.lora settings when it trained over a
    quantized base, which the adapter is then loaded over, as it trained."""
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
        return PeftModel.from_pretrained(_load_base_of(final, quantized), final)
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)


def _load_base_of(adapter_dir: Path, quantized: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models.load import check_weights, load_model, read_adapter_config

    base = read_adapter_config(adapter_dir)["base_model_name_or_path"]
    check_weights(base)
    if quantized is not None and quantized.quantize is not None:
        return load_model(ModelConfig(path=base), quantize=quantized)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
