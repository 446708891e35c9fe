"""`tunelab export RUN_DIR OUT` (the hf format): a run's final/ copied, or with --merge its LoRA folded into a
standalone Hugging Face checkpoint (a QLoRA adapter into a float copy of the dequantized base, its greedy output
checked against the QLoRA model's own)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_dir
from tunelab.errors import TunelabError
from tunelab.strategies.final import save_hf, load_final
from tunelab.strategies.registry import mergeable_peft_types


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
        atomic_dir(out_dir, lambda tmp: save_hf(merged, tokenizer, tmp))
        return "merged the LoRA adapter into a standalone Hugging Face checkpoint"
    trained, merged = merge_over_dequantized(final, quantized)
    atomic_dir(out_dir, lambda tmp: save_hf(merged, tokenizer, tmp))
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
