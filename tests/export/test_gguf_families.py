"""GGUF export of tiny config-built models of each family tunelab exports (tunelab/export/families.py), checked in
llama.cpp's runtime: the file loads as the family's llama.cpp architecture, the prompt ids equal tunelab's, and
greedy generation at f32 equals tunelab's token for token on 20 held-out conversations.

Every model uses SmolLM2's real tokenizer and ChatML template (llama.cpp's converter recognises its pre-tokenizer;
the templates of each family are tested in test_ollama_template.py and the model matrix), so what differs between
the cases is the architecture: its tensor names, hyperparameters and layout as llama.cpp rebuilds them. Qwen2 is the
exception: transformers 5 gives any qwen2 model its Qwen2Tokenizer, whose pre-tokenizer over SmolLM2's vocabulary
llama.cpp does not know, so it has Qwen2's own tokenizer (llama.cpp's test vocabulary, tests/export/conftest.py).
Gemma 2 has a sentencepiece tokenizer (a tokenizer.model, which the converter reads for that family) with the
same ChatML template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from tests.conftest import config_tree, write_jsonl
from tests.export.conftest import TRAIN_CHATS, llama_cpp_tokenizer, sentencepiece_tokenizer, train_run
from tests.models.test_matrix import SMALL
from tunelab.config import validate_config
from tunelab.evaluate.loaders import load_for_eval
from tunelab.export import llamacpp
from tunelab.export.families import FAMILIES
from tunelab.export.gguf import export_gguf
from tunelab.export.parity import check_parity, held_out_inputs
from tunelab.train.loop import train as run_training

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'tunelab[export]')")
pytestmark = pytest.mark.slow

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CONFIGS = {
    "LlamaForCausalLM": (T.LlamaForCausalLM, dict(SMALL, tie_word_embeddings=False)),
    "MistralForCausalLM": (T.MistralForCausalLM, dict(SMALL, sliding_window=None)),
    "Qwen2ForCausalLM": (T.Qwen2ForCausalLM, dict(SMALL)),
    "Qwen3ForCausalLM": (T.Qwen3ForCausalLM, dict(SMALL, head_dim=8)),
    "Gemma2ForCausalLM": (T.Gemma2ForCausalLM, dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=64,
                                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "Gemma3ForCausalLM": (T.Gemma3ForCausalLM, dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)),
    "GPT2LMHeadModel": (T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, **NO_DROPOUT)),
    "GPTNeoXForCausalLM": (T.GPTNeoXForCausalLM, dict(SMALL, hidden_dropout=0.0, attention_dropout=0.0)),
    # Phi-3's architecture with a GPT-2-style BPE tokenizer, as Phi-4 ships it (the converter then reads its vocab as
    # BPE, from tokenizer_config.json's tokenizer_class)
    "Phi3ForCausalLM": (T.Phi3ForCausalLM, dict(SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "Olmo2ForCausalLM": (T.Olmo2ForCausalLM, dict(SMALL)),
}

OWN_TOKENIZERS = {"Qwen2ForCausalLM": lambda: llama_cpp_tokenizer("qwen2"), "Gemma2ForCausalLM": sentencepiece_tokenizer}


def _build(architecture: str, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    cls, kwargs = CONFIGS[architecture]
    source = OWN_TOKENIZERS[architecture]() if architecture in OWN_TOKENIZERS else tokenizer_dir
    tok = AutoTokenizer.from_pretrained(source)
    if tok.chat_template is None:  # the sentencepiece tokenizer: SmolLM2's ChatML template, its markers are symbols
        tok.chat_template = AutoTokenizer.from_pretrained(tokenizer_dir).chat_template
    config = cls.config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kwargs)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # logits of a useful size: a freshly initialised head nearly ties every token
        model.get_output_embeddings().weight.mul_(50.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if (source / "tokenizer.model").is_file():  # a model folder ships its sentencepiece model beside tokenizer.json
        shutil.copyfile(source / "tokenizer.model", out / "tokenizer.model")
    if architecture == "Phi3ForCausalLM":  # as Phi-4's tokenizer_config.json names its tokenizer
        settings = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "GPT2Tokenizer"}))
    return out


def test_every_exported_family_is_tested():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_family_f32_parity_in_llama_cpp(architecture, smollm2, held_out_file, tmp_path):
    model = _build(architecture, smollm2, tmp_path / "model")
    run = train_run(model, tmp_path / "run", {"name": "lora", "lora": {"dropout": 0.0}}, max_steps=1)
    done = export_gguf(run, tmp_path / "out", "f32")
    arch = llamacpp.file_facts(done.gguf, ("general.architecture",)).metadata["general.architecture"]
    assert arch == FAMILIES[architecture].gguf_arch
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


@pytest.mark.parametrize("thinking", [False, True])
def test_a_reasoning_template_is_carried_with_the_thinking_mode_the_run_trained_with(thinking, smollm2,
                                                                                     held_out_file, tmp_path):
    """A run with Qwen3's real chat template (TRL's copy) and data.enable_thinking: the GGUF's template renders the
    prompts the run trained on in llama.cpp, which passes no enable_thinking of its own (Qwen3's template then
    thinks, and adds no empty think block to the generation prompt: without the mode carried, the 20 prompts of
    the non-thinking run differ)."""
    trl = pytest.importorskip("trl")
    qwen3 = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    model = _build("Qwen3ForCausalLM", smollm2, tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Name a fruit.", "An apple."), ("What do cats say?", "Meow.")]]
    run = tmp_path / "run"
    run_training(validate_config(config_tree(model, write_jsonl(tmp_path / "d.jsonl", rows), run,
                                             strategy={"name": "lora", "lora": {"dropout": 0.0}},
                                             data={"max_length": 64, "chat_template": qwen3,
                                                   "enable_thinking": thinking}, train={"max_steps": 1})))
    done = export_gguf(run, tmp_path / "out", "f32")
    em = load_for_eval(str(run), device="cpu", precision="fp32")
    prompts, conversations = held_out_inputs(em, str(held_out_file))
    assert all(p.endswith("<think>\n\n</think>\n\n") != thinking for p in prompts)  # what the run trained on
    report = check_parity(em, done.gguf, conversations, prompts, max_new_tokens=4)
    print("Qwen3 template, enable_thinking", thinking, report.summary())
    assert report.prompt_ids_equal, report.summary()


def test_an_end_of_turn_llama_cpp_does_not_know_by_name_becomes_the_files_eot(smollm2, held_out_file, tmp_path):
    """A chat template whose turns end with a token that is neither EOS nor one of the end-of-turn texts llama.cpp
    knows (SmolLM2's <issue_closed>): the file names it as its EOT token, so llama.cpp ends a generation there."""
    from tunelab.export.gguf import check_carried, read_summary

    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<issue_closed>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    model = _build("LlamaForCausalLM", smollm2, tmp_path / "model")
    run = tmp_path / "run"
    run_training(validate_config(config_tree(model, write_jsonl(tmp_path / "d.jsonl", TRAIN_CHATS), run,
                                             strategy={"name": "lora", "lora": {"dropout": 0.0}},
                                             data={"max_length": 64, "chat_template": template},
                                             train={"max_steps": 1})))
    done = export_gguf(run, tmp_path / "out", "f32")
    summary = read_summary(done.out_dir)
    closed = 10  # <issue_closed> in SmolLM2's vocabulary
    assert summary["turn_end"] == "<issue_closed>" and closed in summary["end_ids"]
    assert summary["marked_end_ids"] == [closed]
    facts = llamacpp.file_facts(done.gguf, ("tokenizer.ggml.eot_token_id",), summary["end_ids"])
    assert facts.metadata["tokenizer.ggml.eot_token_id"] == str(closed)
    assert facts.ends == [True] * len(summary["end_ids"])
    # a place already holding a trained end id is kept: only EOM is free now, so two more unknown ids do not fit
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="1 free places"):
        llamacpp.mark_end_ids(done.gguf, [11, 12], summary["end_ids"])
    # the export's own check reads the file as llama.cpp does: a template other than the trained one is caught
    check_carried(done.gguf, summary)
    with pytest.raises(RuntimeError, match="chat template that differs"):
        check_carried(done.gguf, {**summary, "chat_template": summary["chat_template"] + " "})
    em = load_for_eval(str(run), device="cpu", precision="fp32")
    prompts, conversations = held_out_inputs(em, str(held_out_file))
    report = check_parity(em, done.gguf, conversations, prompts, max_new_tokens=4)  # the rewritten file still runs
    assert report.prompt_ids_equal and report.exact == len(prompts), report.summary()


def test_a_sentencepiece_family_without_its_tokenizer_model_is_refused(smollm2, tmp_path, capsys):
    """Gemma 2's vocabulary reaches llama.cpp's converter only through tokenizer.model: a base folder without it is
    refused with what to do (exit 2, no traceback, nothing written), not a converter crash."""
    from tunelab.cli import main

    model = _build("Gemma2ForCausalLM", smollm2, tmp_path / "model")
    (model / "tokenizer.model").unlink()
    run = train_run(model, tmp_path / "run", {"name": "lora", "lora": {"dropout": 0.0}}, max_steps=1)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--quant", "f32"]) == 2
    err = capsys.readouterr().err
    assert "needs its sentencepiece model (tokenizer.model)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
