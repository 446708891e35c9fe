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
from dataclasses import dataclass
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


def export_run(run_dir: Path, out_dir: Path, merge: bool, quantized: Any = None,
               parity_prompts: list[str] = ()) -> str:
    """Copy (or, with merge, fold LoRA into the weights of) a run's final/ into a standalone folder.

    `quantized`: the run's strategy.lora settings when it trained over a quantized base; its adapter is then merged
    into a float32 copy of the dequantized base (`merge_over_dequantized`), and the merged model's greedy output on
    `parity_prompts` is checked against the adapter over the quantized base (what the message reports)."""
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
    tokenizer = AutoTokenizer.from_pretrained(final)
    if quantized is None or quantized.quantize is None:
        merged = load_final(final).merge_and_unload()
        atomic_dir(out_dir, lambda tmp: _save_hf(merged, tokenizer, tmp))
        return "merged the LoRA adapter into a standalone Hugging Face checkpoint"
    trained, merged = merge_over_dequantized(final, quantized)
    atomic_dir(out_dir, lambda tmp: _save_hf(merged, tokenizer, tmp))
    parity = greedy_parity(trained, merged, tokenizer, parity_prompts)
    return (f"merged the LoRA adapter, trained over a {quantized.quantize} base, into a float32 copy of that base's "
            f"dequantized weights (never into the quantized codes): {parity.summary()}")


@dataclass(frozen=True)
class Parity:
    """Greedy decoding of an exported model against the model it was made from, on the same prompts."""

    prompts: int
    identical: int  # prompts whose greedy continuations are the same tokens
    new_tokens: int
    max_logit_difference: float  # the largest |difference| of next-token logits at the first new token
    logit_scale: float  # the largest |logit| there, for scale

    def summary(self) -> str:
        if not self.prompts:
            return "no prompts to check greedy output on"
        return (f"greedy output identical on {self.identical} of {self.prompts} of the run's training prompts "
                f"({self.new_tokens} new tokens each); next-token logits differ by at most "
                f"{self.max_logit_difference:.2g} (largest logit {self.logit_scale:.3g})")


def merge_over_dequantized(final: Path, quantized: Any) -> tuple[Any, Any]:
    """(the adapter over its quantized base, as it trained; the adapter merged into a float32 copy of the base whose
    quantized layers hold their dequantized weights): the merged model computes what the trained one did."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models.load import load_model, read_adapter_config
    from tunelab.models.quantize import dequantized_weight, quantized_layers

    base_path = read_adapter_config(final)["base_model_name_or_path"]
    trained = PeftModel.from_pretrained(load_model(ModelConfig(path=base_path), quantize=quantized), final).eval()
    copy = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    modules = dict(copy.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(trained.get_base_model()).items():
            modules[name.removeprefix("base_model.model.").removesuffix(".base_layer")].weight.copy_(
                dequantized_weight(layer))
    return trained, PeftModel.from_pretrained(copy, final).merge_and_unload().eval()


def greedy_parity(reference: Any, candidate: Any, tokenizer: Any, prompts: list[str], new_tokens: int = 24) -> Parity:
    """Greedy continuations of each prompt by both models, and their next-token logits at the first new token."""
    import torch

    identical, worst, scale = 0, 0.0, 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ref_logits, cand_logits = reference(**ids).logits[0, -1], candidate(**ids).logits[0, -1]
            worst = max(worst, float((ref_logits - cand_logits).abs().max()))
            scale = max(scale, float(ref_logits.abs().max()))
            outs = [m.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                    for m in (reference, candidate)]
        identical += int(torch.equal(outs[0], outs[1]))
    return Parity(len(prompts), identical, new_tokens, worst, scale)
