"""Reasoning models' chat templates, the real ones: Qwen3's (it writes a think block into the last assistant turn and
drops it from earlier ones, and its generation prompt depends on enable_thinking) and the DeepSeek-R1 distills'
(its generation prompt opens a think block that no rendered turn shows). Both are read from the installed trl
package, which keeps the official templates byte-identical: trl/chat_templates/qwen3.jinja and
deepseek_r1_distill.jinja (see trl/chat_templates/README.md).

Each trained mask is checked against one derived here from the message fields alone (the think-block format the
models write, the reply, the end-of-turn token), the prompt against transformers' apply_chat_template with
add_generation_prompt=True and the run's thinking setting, and the step-1 loss against transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

from tests import tokenizer_layouts as layouts
from tests.conftest import config_tree, write_jsonl
from tests.data.test_encode_labels import _labeled_runs
from tunelab.config import DataConfig, validate_config
from tunelab.data.audit import audit
from tunelab.data.encode import IGNORE, encode_examples, tokenize_texts
from tunelab.data.records import Example
from tunelab.data.render import RenderSpec, render_example, turn_end
from tunelab.errors import DataError
from tunelab.models.load import stop_token_ids

trl = pytest.importorskip("trl", reason="the real templates come from trl (installed by the bench extra)")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"
QWEN3 = (TEMPLATES / "qwen3.jinja").read_text()
R1 = (TEMPLATES / "deepseek_r1_distill.jinja").read_text()
EOS = {"qwen3": "<|im_end|>", "r1": "<｜end▁of▁sentence｜>"}


def _tokenizer(family: str):
    """A byte-level tokenizer with the family's special tokens (Qwen3: <|im_end|> is its instruct models' EOS;
    <think> and </think> are added tokens of both families)."""
    if family == "qwen3":
        tok = layouts.byte_level("<|im_end|>", extra=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                 pad="<|endoftext|>")
        tok.chat_template = QWEN3
    else:
        tok = layouts.byte_level(EOS["r1"], bos="<｜begin▁of▁sentence｜>", pad="<｜▁pad▁｜>",
                                 extra=["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"])
        tok.chat_template = R1
    return tok


SINGLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"},
          {"role": "assistant", "content": "Fine, thank you."}]
MULTI = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "How do you do?"},
         {"role": "user", "content": "Tell me a story."},
         {"role": "assistant", "content": "Once upon a time there was a little cat."}]
REASONING = {"reasoning_content": "The sky is blue."}


def _conversations(reasoning: str) -> list[list[dict[str, str]]]:
    """Single- and multi-turn chats; with reasoning as a field ('field') or as a think prefix of the content."""
    out = []
    for chat in (SINGLE, MULTI):
        chat = [dict(m) for m in chat]
        if reasoning == "field":
            for m in chat:
                if m["role"] == "assistant":
                    m.update(REASONING)
        elif reasoning == "prefix":
            for m in chat:
                if m["role"] == "assistant":
                    m["content"] = "<think>\nThe sky is blue.\n</think>\n\n" + m["content"]
        out.append(chat)
    return out


def _reasoning(m: dict[str, str]) -> str:
    return m.get("reasoning_content") or ("The sky is blue." if m["content"].startswith("<think>") else "")


def _reply(m: dict[str, str]) -> str:
    return m["content"].split("</think>\n\n")[-1]


def _expected_runs(family: str, chat: list[dict[str, str]], thinking: bool) -> list[str]:
    """What each assistant turn trains, from the fields: earlier turns as history shows them (the reply and the end
    of turn); the last turn what the model writes after the generation prompt: Qwen3 with thinking on writes the
    think block, '<think>\\n' + reasoning + '\\n</think>\\n\\n'; off, its prompt holds the empty block. DeepSeek's
    prompt opens the block, so the turn starts with the reasoning."""
    turns = [m for m in chat if m["role"] == "assistant"]
    # DeepSeek's history keeps what follows '</think>' as it is (the newlines included); Qwen3's strips them
    runs = [(_reply(m) if family == "qwen3" else m["content"].split("</think>")[-1]) + EOS[family] for m in turns[:-1]]
    last = turns[-1]
    block = _reasoning(last) + "\n</think>\n\n"
    head = ("<think>\n" + block if thinking else "") if family == "qwen3" else block
    return runs + [head + _reply(last) + EOS[family]]


def _render(family: str, chat: list[dict[str, str]], thinking: bool):
    tok = _tokenizer(family)
    ex = Example("chat", {"messages": chat}, "chat.jsonl:1", 0)
    # the record as the reader passes it: reasoning_content kept only where given
    rendered = render_example(ex, RenderSpec(enable_thinking=thinking), tok)
    (enc,) = encode_examples([rendered], tok, 512)
    return tok, rendered, enc


CASES = [(family, reasoning, thinking) for family in ("qwen3", "r1") for reasoning in ("none", "field", "prefix")
         for thinking in (False, True) if not (family == "qwen3" and reasoning != "none" and not thinking)]


@pytest.mark.parametrize("family, reasoning, thinking", CASES)
def test_trained_mask_and_prompt_match_an_independent_derivation(family, reasoning, thinking):
    for chat in _conversations(reasoning):
        tok, rendered, enc = _render(family, chat, thinking)
        assert _labeled_runs(enc, tok) == _expected_runs(family, chat, thinking), (family, reasoning, thinking, chat)
        # the prompt the last turn is trained after, and that chat/generate/eval render, is transformers' own
        # generation prompt with the run's thinking setting
        last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
        want = tok.apply_chat_template(chat[:last], add_generation_prompt=True, enable_thinking=thinking,
                                       tokenize=True, return_dict=False)
        assert tokenize_texts(tok, [rendered.prompt])[0][0] == list(want)
        assert enc.input_ids[: len(want)] == list(want)
        assert enc.labels[len(want) - 1] == IGNORE and enc.labels[len(want)] != IGNORE  # the last turn starts there


def test_reasoning_with_thinking_off_is_refused_with_the_fix():
    chat = _conversations("field")[0]
    with pytest.raises(DataError, match="data.enable_thinking: true"):
        _render("qwen3", chat, False)


@pytest.mark.parametrize("family", ["qwen3", "r1"])
def test_generation_stops_at_the_end_of_turn(family):
    tok = _tokenizer(family)
    for thinking in (False, True):
        end = turn_end(RenderSpec(enable_thinking=thinking), tok, True)
        assert end == EOS[family]

    class Model:
        class generation_config:
            eos_token_id = None

    assert tok.convert_tokens_to_ids(EOS[family]) in stop_token_ids(tok, Model, [end])


def test_data_check_names_a_template_that_is_not_prefix_stable(tmp_path):
    tok = _tokenizer("qwen3")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI}] * 3)
    result = audit(str(path), DataConfig(train=str(path)), RenderSpec(enable_thinking=True), tok)
    finding = result["chat_template"]
    assert finding["count"] == 3 and "not prefix-stable" in finding["message"]
    assert "data.last_turn_only" in finding["message"]
    assert result["preview"][0]["trained"] == _expected_runs("qwen3", MULTI, True)
    assert not result["blocking"]
    # a prefix-stable template (ChatML) gets no such finding
    tok.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert "chat_template" not in audit(str(path), DataConfig(train=str(path)), RenderSpec(), tok)


@pytest.mark.slow
@pytest.mark.parametrize("family, thinking", [("qwen3", True), ("qwen3", False), ("r1", True)])
def test_step_one_loss_equals_transformers_on_the_derived_mask(family, thinking, tmp_path):
    """A tiny config-built model (Qwen3, or Qwen2 for the Qwen-based R1 distills) trains one step on single-turn
    chats with and without reasoning; its loss is transformers' own on the mask built here from the fields."""
    from tunelab.data.batching import pad_collate
    from tunelab.data.encode import Encoded
    from tunelab.train.loop import train
    from tunelab.train.session import seed_everything
    from tunelab.runfiles import read_metrics

    tok = _tokenizer(family)
    cls = T.Qwen3ForCausalLM if family == "qwen3" else T.Qwen2ForCausalLM
    config = cls.config_class(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    chats = [SINGLE, [*SINGLE[:2], {**SINGLE[2], **REASONING}]] if thinking else [SINGLE, MULTI[:2]]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    derived = []
    for c in chats:  # prompt ids from transformers, target ids from the fields
        prompt = list(tok.apply_chat_template(c[:-1], add_generation_prompt=True, enable_thinking=thinking,
                                              tokenize=True, return_dict=False))
        target = tok(_expected_runs(family, c, thinking)[-1], add_special_tokens=False)["input_ids"]
        derived.append(Encoded(prompt + target, [IGNORE] * len(prompt) + target, "", 0))
    batch = pad_collate(derived, tok.pad_token_id)
    model = cls.from_pretrained(tmp_path / "model", dtype=torch.float32)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    cfg = validate_config(config_tree(tmp_path / "model", data, tmp_path / "run", strategy={"name": "full"},
                                      data={"max_length": 128, "enable_thinking": thinking},
                                      train={"max_steps": 1, "batch_size": len(chats), "learning_rate": 1e-3}))
    seed_everything(cfg.train.seed)
    train(cfg)
    first = next(r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["type"] == "train")
    assert first["loss"] == pytest.approx(float(reference), rel=1e-6)
