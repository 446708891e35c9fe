"""The architecture matrix: tiny random models of 14 families built from their transformers configs, each with a
tokenizer in its family's layout and special tokens (tests/tokenizer_layouts.py) and its real chat template where
the family ships one (the base-model families get tunelab's fallback template, as a user of a base model would).

For each family and each of full, LoRA, a soft prompt, prompt+LM and freeze: the trained tokens of every assistant
turn are exactly its content and the template's end of turn; the step-1 loss of a real training run equals the loss
that transformers computes on the same examples and mask (for the soft prompts, peft's own prompt tuning on a model
loaded with plain transformers, its default attention and eager: tunelab's loading, attention and prompt slots are
checked, with tunelab's first prompt and with a strong random one that dominates the loss); final/ loads with
plain transformers/peft; the run evaluates (generation on the device)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as T

from tests import tokenizer_layouts as layouts
from tests.conftest import config_tree, write_jsonl
from tests.data.test_chat_turns import TEMPLATES
from tests.data.test_encode_labels import _labeled_runs
from tunelab.config import validate_config
from tunelab.data.batching import pack_best_fit, packed_collate, pad_collate
from tunelab.data.dataset import load_datasets
from tunelab.data.render import spec_from_config
from tunelab.cli import main
from tunelab.models.load import load_model, load_tokenizer, pad_token_id
from tunelab.strategies.final import load_final
from tunelab.strategies.model import TrainModel
from tunelab.strategies.prepare import prepare_strategy
from tunelab.train.loop import train
from tunelab.train.session import seed_everything
from tunelab.runfiles import read_metrics

# meta-llama/Llama-2-13b-chat-hf, as mistral.rs's test of chat templates quotes it (see tests/data/test_chat_turns.py)
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# allenai/OLMo-2-1124-7B-SFT's tokenizer_config.json chat_template (the Tulu 3 template with a BOS), as quoted by
# the OLMo 2 fine-tuning scripts that set it on the base model's tokenizer
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + "
         "message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + "
         "'\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + "
         "message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
         "{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
         "{% endfor %}")
# CohereForAI/c4ai-command-r-plus's default chat template, as llama.cpp's tests/test-chat-template.cpp quotes it
COMMAND_R = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
             "system_message = messages[0]['content'] %}{% elif false == true %}{% set loop_messages = messages %}"
             "{% set system_message = 'You are Command-R, a brilliant, sophisticated, AI-assistant trained to assist "
             "human users by providing thorough responses. You are trained by Cohere.' %}{% else %}{% set "
             "loop_messages = messages %}{% set system_message = false %}{% endif %}{% if system_message != false %}"
             "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
             "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% set content = message['content'] %}{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|>"
             "<|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% elif message['role'] == 'assistant' %}"
             "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")
COMMAND_R_MARKERS = ["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]
GEMMA_MARKERS = ["<start_of_turn>", "<end_of_turn>"]
PHI3_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
NO_DROPOUT = {"attention_dropout": 0.0}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _sp(bos="<s>", eos="</s>", extra=(), pad=None):
    return lambda: layouts.sentencepiece_style(bos, eos, "<unk>", list(extra), pad=pad)


def _bl(eos="<|endoftext|>", bos=None, extra=(), pad=None, add_bos=False):
    return lambda: layouts.byte_level(eos, bos, list(extra), pad=pad, add_bos=add_bos)


# family: (model class, config kwargs, tokenizer, chat template or None, how a turn's trained text ends)
FAMILIES = {
    "llama": (T.LlamaForCausalLM, dict(SMALL, tie_word_embeddings=False), _sp(), LLAMA2, " </s>"),
    "mistral": (T.MistralForCausalLM, dict(SMALL, sliding_window=None), _sp(), TEMPLATES["mistral"], "</s>"),
    "qwen2": (T.Qwen2ForCausalLM, dict(SMALL, tie_word_embeddings=True),
              _bl("<|im_end|>", extra=CHATML_MARKERS, pad="<|endoftext|>"), TEMPLATES["chatml"], "<|im_end|>"),
    "qwen3": (T.Qwen3ForCausalLM, dict(SMALL, head_dim=8), _bl("<|im_end|>", extra=CHATML_MARKERS,
                                                               pad="<|endoftext|>"), TEMPLATES["chatml"], "<|im_end|>"),
    "gemma2": (T.Gemma2ForCausalLM, dict(SMALL, head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=8),
               _sp("<bos>", "<eos>", GEMMA_MARKERS, pad="<pad>"), TEMPLATES["gemma"], "<end_of_turn>"),
    "gemma3": (T.Gemma3ForCausalLM, dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
               _sp("<bos>", "<eos>", GEMMA_MARKERS, pad="<pad>"), TEMPLATES["gemma"], "<end_of_turn>"),
    "phi3": (T.Phi3ForCausalLM, dict(SMALL, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=None),
             _sp(eos="<|endoftext|>", extra=PHI3_MARKERS), TEMPLATES["phi3"], "<|end|>"),
    "gpt2": (T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0), _bl(), None, "<|endoftext|>"),
    "gpt_neox": (T.GPTNeoXForCausalLM, dict(SMALL, hidden_dropout=0.0), _bl(), None, "<|endoftext|>"),
    "opt": (T.OPTForCausalLM, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=16, dropout=0.0, max_position_embeddings=256),
            _bl("</s>", bos="</s>", pad="<pad>", add_bos=True), None, "</s>"),
    "falcon": (T.FalconForCausalLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         hidden_dropout=0.0), _bl(), None, "<|endoftext|>"),
    "olmo2": (T.Olmo2ForCausalLM, dict(SMALL), _bl(bos="<|endoftext|>", pad="<|pad|>"), OLMO2, "<|endoftext|>"),
    "cohere": (T.CohereForCausalLM, dict(SMALL, logit_scale=0.25),
               _bl("<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", extra=COMMAND_R_MARKERS, pad="<PAD>", add_bos=True),
               COMMAND_R, "<|END_OF_TURN_TOKEN|>"),
    "qwen2_moe": (T.Qwen2MoeForCausalLM, dict(SMALL, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                              num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
                  _bl("<|im_end|>", extra=CHATML_MARKERS, pad="<|endoftext|>"), TEMPLATES["chatml"], "<|im_end|>"),
}
STRATEGIES = {"full": {"name": "full"}, "lora": {"name": "lora", "lora": {"dropout": 0.0}},
              "soft_prompt": {"name": "soft_prompt", "soft_prompt": {"num_virtual_tokens": 3}},
              "prompt_lm": {"name": "prompt_lm", "soft_prompt": {"num_virtual_tokens": 3}},
              "freeze": {"name": "freeze", "freeze": {"trainable_layers": 1}}}
CHATS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                       {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "See you tomorrow."}]}
         for q, a in [("How are you today?", "Fine, thank you."), ("What colour is the sky?", "It is blue."),
                      ("Tell me a story.", "Once upon a time there was a little cat.")]]


def _build(family: str, out: Path) -> Path:
    cls, kwargs, make_tokenizer, template, _ = FAMILIES[family]
    tok = make_tokenizer()
    if template:
        tok.chat_template = template
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if "pad_token_id" not in kwargs else kwargs["pad_token_id"]}
    config = cls.config_class(vocab_size=len(tok), **{**kwargs, **ids})
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _plain_peft_prompt_loss(model_dir: Path, prompt: torch.Tensor, batch: dict, attn: str | None = None) -> float:
    """The loss of peft's own prompt tuning, holding `prompt`, on a model loaded as a user of plain transformers
    loads it (`attn`: the attention implementation asked for; None: transformers' default for the family):
    independent of tunelab's model loading, attention choice and soft-prompt slots."""
    from peft import PromptTuningConfig, get_peft_model

    plain = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                   **({"attn_implementation": attn} if attn else {}))
    model = get_peft_model(plain, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0],
                                                     token_dim=prompt.shape[1]))
    model.train()  # every dropout is 0 in these configs
    with torch.no_grad():
        model.prompt_encoder[model.active_adapter].embedding.weight.copy_(prompt)
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)


def _assert_made_of_token_embeddings(model_dir: Path, prompt: torch.Tensor) -> None:
    """peft's own initialisations (sampled vocabulary, text) take token embeddings as the model's embedding module
    gives them (Gemma's scaled by sqrt(hidden)): each of tunelab's first prompt vectors must be one of them."""
    embeddings = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).get_input_embeddings()
    with torch.no_grad():
        every_token = embeddings(torch.arange(embeddings.num_embeddings))  # (vocab, width)
    nearest = torch.cdist(prompt.detach(), every_token, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert nearest.max() < 1e-5, f"the first prompt is not made of token embeddings as the model gives them: {nearest}"


def _assert_prompt_slots_match_peft(model: TrainModel, encoded: list, tokenizer, model_dir: Path, family: str) -> None:
    """tunelab's loss with a strong random prompt in its slots (padded rows, and packed rows where the model packs)
    equals peft's prepended prompt on plain transformers, default and eager attention. A token-scale prompt barely
    moves a tiny random model's loss (a prompt scaled twice moves it 1.2e-5); this one dominates it."""
    v, width = model.soft_prompt().shape
    strong = 3 * torch.randn(v, width, generator=torch.Generator().manual_seed(0))  # (virtual, width)
    with torch.no_grad():
        model.lm.prompt_encoder[model.lm.active_adapter].embedding.weight.copy_(strong)
        pad = pad_token_id(tokenizer)
        batches = [pad_collate(encoded, pad, v)]
        if model.can_pack:
            rows = pack_best_fit([len(e.input_ids) + v for e in encoded], 256)
            batches.append(packed_collate([[encoded[i] for i in row] for row in rows], pad, 256, v))
        losses = [float(total) / count for total, count, _ in (model(b) for b in batches)]
    plain = [_plain_peft_prompt_loss(model_dir, strong, pad_collate(encoded, pad), attn) for attn in (None, "eager")]
    for loss in losses + plain[1:]:
        assert loss == pytest.approx(plain[0], rel=1e-6), (family, losses, plain)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family, tmp_path, caplog, capsys):
    model_dir = _build(family, tmp_path / "model")
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    end = FAMILIES[family][4]
    for name, strategy in STRATEGIES.items():
        cfg = validate_config(config_tree(model_dir, data, tmp_path / name, strategy=strategy, data={"max_length": 96},
                                          train={"max_steps": 1, "batch_size": len(CHATS), "learning_rate": 1e-3}))
        tokenizer = load_tokenizer(cfg.model)
        encoded = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, 0)[0].encoded
        # the mask, built from the messages alone: each assistant turn's content and the template's end of turn,
        # nothing else (no whitespace after it; the decoder may drop one leading space marker)
        for chat, enc in zip(CHATS, encoded):
            want = [m["content"] + end for m in chat["messages"] if m["role"] == "assistant"]
            assert [r.lstrip() for r in _labeled_runs(enc, tokenizer)] == want, (family, name, enc.source)

        # transformers' own loss on the same examples, that mask and weights (for the soft prompts, peft's own on a
        # plain transformers model, tunelab's first prompt copied in)
        seed_everything(cfg.train.seed)
        reference_model = prepare_strategy(load_model(cfg.model), cfg.strategy, tokenizer, cfg.train.seed)
        reference_model.train()  # as the first step runs it (every dropout is 0 in these configs)
        batch = pad_collate(encoded, pad_token_id(tokenizer))
        if reference_model.virtual_tokens:
            _assert_made_of_token_embeddings(model_dir, reference_model.soft_prompt())
            reference = _plain_peft_prompt_loss(model_dir, reference_model.soft_prompt(), batch)
            _assert_prompt_slots_match_peft(reference_model, encoded, tokenizer, model_dir, family)
        else:
            with torch.no_grad():
                reference = reference_model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               labels=batch["labels"]).loss

        with caplog.at_level(logging.WARNING):
            train(cfg)
        first = next(r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["type"] == "train")
        assert first["loss"] == pytest.approx(float(reference), rel=2e-5), (family, name)

        final = load_final(Path(cfg.output_dir) / "final")  # plain transformers / peft
        assert final is not None
        out = tmp_path / f"eval-{name}.json"  # `tunelab eval` of the run on its chats, generating on the device
        code = main(["eval", cfg.output_dir, str(data), "--mode", "generate", "--max-new-tokens", "3",
                     "--output", str(out)])
        assert code == 0, (family, name, capsys.readouterr().err[-2000:])
        summary = json.loads(out.read_text())
        # every chat's last reply is the same, a closed label set since a91b9c5: label metrics, exact match among them
        assert summary["num_examples"] == len(CHATS) and "exact_match" in summary["metrics"]
