"""The model families tunelab exports to GGUF (each tested through llama.cpp's converter and runtime) and what
vLLM's LoRA loads for each."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import TunelabError

# the linear layers of a decoder block, by family: vLLM's LoRA applies to these (its models' packed modules:
# qkv_proj packs q/k/v, gate_up_proj packs gate/up), and so to any subset of them
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str  # tunelab's name of the family
    gguf_arch: str  # llama.cpp's general.architecture
    vllm_lora_modules: tuple[str, ...]  # the target_modules names vLLM's LoRA supports for it (none: no LoRA)


FAMILIES = {
    "LlamaForCausalLM": Family("llama", "llama", _LLAMA_LIKE),
    "MistralForCausalLM": Family("mistral", "llama", _LLAMA_LIKE),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", _LLAMA_LIKE),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", _LLAMA_LIKE),
    "Gemma2ForCausalLM": Family("gemma2", "gemma2", _LLAMA_LIKE),
    "Gemma3ForCausalLM": Family("gemma3", "gemma3", _LLAMA_LIKE),
    "GPT2LMHeadModel": Family("gpt2", "gpt2", ("c_attn", "c_proj", "c_fc")),
    "GPTNeoXForCausalLM": Family("gpt_neox", "gptneox", ()),  # vLLM's GPT-NeoX takes no LoRA adapters
    "Phi3ForCausalLM": Family("phi3", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "Olmo2ForCausalLM": Family("olmo2", "olmo2", _LLAMA_LIKE),
}


def family_of(architecture: str, where: str) -> Family:
    """The family of a Hugging Face architecture class name, or a TunelabError naming the supported ones."""
    if architecture in FAMILIES:
        return FAMILIES[architecture]
    supported = ", ".join(f"{f.name} ({arch})" for arch, f in FAMILIES.items())
    raise TunelabError(f"'{where}' is a {architecture} model, which tunelab does not export to GGUF: it exports the "
                       f"families it has checked against llama.cpp's runtime, {supported}. Nothing was written. "
                       "Export a Hugging Face folder instead (tunelab export RUN_DIR OUT --merge) and convert it "
                       "with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports this architecture.")
