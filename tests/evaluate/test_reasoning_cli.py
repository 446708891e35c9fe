"""Reasoning chat templates through the commands: a tiny config-built Qwen3 with Qwen3's real template (trained with
data.enable_thinking off and on) and a tiny Qwen2 with the DeepSeek-R1 distills' template, each trained one step on
chats with a system turn, then `tunelab eval --mode generate`, `tunelab generate --prompt` and `tunelab chat`.

The templates are the official ones as trl keeps them byte-identical (trl/chat_templates/qwen3.jinja and
deepseek_r1_distill.jinja; see tests/data/test_reasoning_templates.py). The Qwen3 tokenizer has the layout of Qwen3's
base models, whose EOS is <|endoftext|>: <|im_end|> ends a turn only because the template says so, so eval can stop
there only by the run's trained end of turn. Each model's output head makes that end of turn the greedy choice at
every position (a large component shared by every token embedding, read by its row of the untied head), so a
generation that stops at it ends at once (no new token before it) and one that does not runs to --max-new-tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from tests import tokenizer_layouts as layouts
from tests.conftest import config_tree, write_jsonl
from tests.data.test_reasoning_templates import QWEN3, _tokenizer
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.evaluate.generate import encode_prompts
from tunelab.train.loop import train

ROWS = [("I still have not received my new card.", "card_arrival"), ("How do I top up by card?", "top_up_by_card"),
        ("My card payment was declined.", "declined_card_payment")]  # banking77-like: a message and its intent
SYSTEM = "Classify the customer's message."
END = {"qwen3": "<|im_end|>", "r1": "<｜end▁of▁sentence｜>"}


def _qwen3_base_tokenizer():
    """Qwen3 base models' layout: EOS and pad <|endoftext|>; <|im_start|>, <|im_end|>, <think>, </think> added."""
    tok = layouts.byte_level("<|endoftext|>", extra=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                             pad="<|endoftext|>")
    tok.chat_template = QWEN3
    return tok


def _build(family: str, out):
    tok = _qwen3_base_tokenizer() if family == "qwen3" else _tokenizer("r1")
    cls = T.Qwen3ForCausalLM if family == "qwen3" else T.Qwen2ForCausalLM
    config = cls.config_class(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = cls(config)
    end = tok.convert_tokens_to_ids(END[family])
    shared = torch.randn(config.hidden_size)
    with torch.no_grad():  # every position's last hidden state points along `shared`, which only END's row reads
        model.get_input_embeddings().weight += shared
        model.lm_head.weight[end] = 10 * shared / shared.norm()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok


def _train(tmp_path, family: str, thinking: bool):
    tok = _build(family, tmp_path / "model")
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
              {"role": "assistant", "content": intent}] for text, intent in ROWS]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    cfg = validate_config(config_tree(tmp_path / "model", data, tmp_path / "run", strategy={"name": "lora"},
                                      data={"max_length": 128, "enable_thinking": thinking},
                                      train={"max_steps": 1, "batch_size": len(chats), "learning_rate": 1e-3}))
    train(cfg)
    return cfg, tok, data


def _generation_prompt(tok, messages, thinking: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=False)


def _generation_prompt_ids(tok, messages, thinking: bool) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                        tokenize=True, return_dict=False))


@pytest.mark.slow
@pytest.mark.parametrize("family, thinking", [("qwen3", False), ("qwen3", True), ("r1", True)])
def test_eval_generate_and_chat_render_as_the_run_trained(family, thinking, tmp_path, capsys):
    cfg, tok, data = _train(tmp_path, family, thinking)

    # eval: the prompt of each row is transformers' generation prompt; generation stops at the run's end of turn
    summary, predictions = tmp_path / "eval.json", tmp_path / "predictions.jsonl"
    assert main(["eval", cfg.output_dir, str(data), "--mode", "generate", "--max-new-tokens", "4", "--output",
                 str(summary), "--predictions", str(predictions)]) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    for (text, _), row in zip(ROWS, rows):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        assert row["input"] == _generation_prompt(tok, messages, thinking)
        assert encode_prompts(tok, [row["input"]])[0] == _generation_prompt_ids(tok, messages, thinking)
        assert row["ended_with_eos"] is True and row["num_tokens"] == 0 and row["prediction"] == "", row
        assert row["reference"] == dict(ROWS)[text]  # the reply: no think block, no end of turn
    assert json.loads(summary.read_text())["eos_rate"] == 1.0

    # generate --prompt: a user turn, rendered as transformers does with the run's thinking setting
    out = tmp_path / "generate.jsonl"
    assert main(["generate", cfg.output_dir, "--prompt", ROWS[0][0], "--max-new-tokens", "4", "--output",
                 str(out)]) == 0, capsys.readouterr().err[-2000:]
    (generated,) = [json.loads(line) for line in out.read_text().splitlines()]
    user = [{"role": "user", "content": ROWS[0][0]}]
    assert generated["prompt"] == _generation_prompt(tok, user, thinking)
    assert encode_prompts(tok, [generated["prompt"]])[0] == _generation_prompt_ids(tok, user, thinking)
    assert generated["num_tokens"] == 0 and generated["output"] == ""  # ended at the end of turn

    # chat through a pipe, --show-prompt: each turn's prompt, the reply (empty: it ended at once) in the history
    script = f"/system {SYSTEM}\n{ROWS[1][0]}\nAnd my card?\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "tunelab", "chat", cfg.output_dir, "--show-prompt",
                           "--max-new-tokens", "4"], input=script, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = [__import__("ast").literal_eval(line.split("[prompt] ", 1)[1]) for line in proc.stdout.splitlines()
             if "[prompt] " in line]
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ROWS[1][0]}]
    later = [*first, {"role": "assistant", "content": ""}, {"role": "user", "content": "And my card?"}]
    assert shown == [_generation_prompt(tok, first, thinking), _generation_prompt(tok, later, thinking)]
    assert encode_prompts(tok, shown)[0] == _generation_prompt_ids(tok, first, thinking)
