"""GGUF export of tiny config-built models of each family tunelab exports (tunelab/export/families.py), checked in
llama.cpp's runtime: the file loads as the family's llama.cpp architecture, the prompt ids equal tunelab's, and
greedy generation at f32 equals tunelab's token for token on 20 held-out conversations.

Every model uses SmolLM2's real tokenizer and ChatML template (llama.cpp's converter recognises its pre-tokenizer;
the templates of each family are tested in test_ollama_template.py and the model matrix), so what differs between
the cases is the architecture: its tensor names, hyperparameters and layout as llama.cpp rebuilds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

from tests.export.conftest import train_run
from tests.models.test_matrix import SMALL
from tunelab.evaluate.loaders import load_for_eval
from tunelab.export.families import FAMILIES
from tunelab.export.gguf import export_gguf
from tunelab.export.parity import check_parity, held_out_inputs

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'tunelab[export]')")
pytestmark = pytest.mark.slow

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CONFIGS = {
    "LlamaForCausalLM": (T.LlamaForCausalLM, dict(SMALL, tie_word_embeddings=False)),
    "MistralForCausalLM": (T.MistralForCausalLM, dict(SMALL, sliding_window=None)),
    "Qwen3ForCausalLM": (T.Qwen3ForCausalLM, dict(SMALL, head_dim=8)),
    "Gemma3ForCausalLM": (T.Gemma3ForCausalLM, dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)),
    "GPT2LMHeadModel": (T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, **NO_DROPOUT)),
    "Olmo2ForCausalLM": (T.Olmo2ForCausalLM, dict(SMALL)),
}


def _build(architecture: str, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    cls, kwargs = CONFIGS[architecture]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = cls.config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kwargs)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # logits of a useful size: a freshly initialised head nearly ties every token
        model.get_output_embeddings().weight.mul_(50.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_every_exported_family_is_tested():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_family_f32_parity_in_llama_cpp(architecture, smollm2, held_out_file, tmp_path):
    from gguf import GGUFReader

    model = _build(architecture, smollm2, tmp_path / "model")
    run = train_run(model, tmp_path / "run", {"name": "lora", "lora": {"dropout": 0.0}}, max_steps=1)
    done = export_gguf(run, tmp_path / "out", "f32")
    reader = GGUFReader(done.gguf)
    assert reader.fields["general.architecture"].contents() == FAMILIES[architecture].gguf_arch
    em = load_for_eval(str(run), device="cpu", precision="fp32")
    prompts, conversations = held_out_inputs(em, str(held_out_file))
    report = check_parity(em, done.gguf, conversations, prompts, max_new_tokens=32)
    print(architecture, report.summary())
    assert report.prompt_ids_equal and report.exact == len(prompts), report.summary()


@pytest.mark.parametrize("lora", [{"quantize": "nf4"}, {"quantize": "nf4", "quantize_embeddings": True}],
                         ids=["qlora", "quantize_embeddings"])
def test_a_qlora_run_exports_the_model_it_trained(lora, smollm2, held_out_file, tmp_path):
    """A QLoRA run's adapter goes into the GGUF merged into a float copy of its dequantized 4-bit base (never into
    the codes, nor into the original float weights the 4-bit base was made from): llama.cpp's greedy output at f32
    equals the QLoRA model's own, token for token, on the 20 held-out conversations."""
    pytest.importorskip("bitsandbytes")
    model = _build("LlamaForCausalLM", smollm2, tmp_path / "model")
    run = train_run(model, tmp_path / "run", {"name": "lora", "lora": {"dropout": 0.0, **lora}}, max_steps=1)
    done = export_gguf(run, tmp_path / "out", "f32")
    em = load_for_eval(str(run), device="cpu", precision="fp32")  # the adapter over its 4-bit base, as it trained
    prompts, conversations = held_out_inputs(em, str(held_out_file))
    report = check_parity(em, done.gguf, conversations, prompts, max_new_tokens=32)
    print("QLoRA", lora, report.summary())
    assert report.prompt_ids_equal and report.exact == len(prompts), report.summary()
