"""`tunelab generate`: new inputs rendered exactly as the run's training data, then continued."""

from __future__ import annotations

import json

import pytest

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.data.dataset import load_datasets
from tunelab.data.encode import IGNORE
from tunelab.data.render import spec_from_config
from tunelab.evaluate.generate import encode_prompts, generate
from tunelab.evaluate.inputs import Inputs
from tunelab.evaluate.loaders import load_for_eval
from tunelab.train.loop import train

QA = [{"question": f"What colour is the {t}?", "answer": c} for t, c in
      [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("sun", "yellow"), ("rose", "red")]]
# ChatML, as Qwen2.5's tokenizer_config.json writes it (without the tool-call branches): a real family's template
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _run(tmp_path, stories260k, name, rows, **sections):
    tree = config_tree(stories260k, write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / name,
                       train={"max_steps": 2}, **sections)
    cfg = validate_config(tree)
    train(cfg)
    return cfg


def _training_prompt_ids(cfg, record_index, tokenizer):
    """The prompt tokens of one record as training encoded it (the training data's own loading and encoding)."""
    split, _ = load_datasets(cfg.data, spec_from_config(cfg), tokenizer, cfg.train.seed)
    enc = next(e for e in split.encoded if e.row == record_index)
    first = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
    return enc.input_ids[:first]


@pytest.mark.parametrize("kind", ["template", "chat"])
def test_prompt_ids_equal_the_training_prompt_ids(tmp_path, stories260k, kind):
    if kind == "template":
        cfg = _run(tmp_path, stories260k, "qa", QA, data={"columns": {"prompt": "question", "completion": "answer"}},
                   strategy={"name": "lora", "template": {"prompt": "Q: {prompt}\nA:", "target": " {completion}"}})
        records = [{"question": r["question"]} for r in QA]  # the target column absent
    else:
        rows = [{"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["answer"]}]} for r in QA]
        cfg = _run(tmp_path, stories260k, "chat", rows, data={"chat_template": CHATML})
        records = [{"messages": r["messages"][:2]} for r in rows]  # ending with the user's turn
    em = load_for_eval(cfg.output_dir)
    inputs = Inputs(em.run_config)
    file_examples = inputs.from_file(str(write_jsonl(tmp_path / "new.jsonl", records)))
    ids = encode_prompts(em.tokenizer, inputs.prompts(file_examples, em.tokenizer))
    for i in range(len(QA)):
        assert ids[i] == _training_prompt_ids(cfg, i, em.tokenizer), i
    if kind == "template":  # --prompt TEXT fills the prompt field
        text_ids = encode_prompts(em.tokenizer, inputs.prompts(inputs.from_texts([QA[2]["question"]]), em.tokenizer))
        assert text_ids[0] == _training_prompt_ids(cfg, 2, em.tokenizer)


def test_the_command_writes_what_generate_gives(tmp_path, stories260k, capsys):
    cfg = _run(tmp_path, stories260k, "qa", QA, data={"columns": {"prompt": "question", "completion": "answer"}},
               strategy={"name": "full", "template": {"prompt": "Q: {prompt}\nA:", "target": " {completion}"}})
    out = tmp_path / "g.jsonl"
    assert main(["generate", cfg.output_dir, "--prompt", "What colour is the sea?", "--prompt", "Hi",
                 "--max-new-tokens", "6", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Q: What colour is the sea?\nA:", "Q: Hi\nA:"]
    em = load_for_eval(cfg.output_dir)
    expected = generate(em, [r["prompt"] for r in rows], 6)
    assert [r["output"] for r in rows] == [g.text for g in expected]
    assert all(0 < r["num_tokens"] <= 6 for r in rows)
    # a plain model folder: the prompt is a user turn of its chat template (stories260K has none: tunelab's fallback)
    capsys.readouterr()
    assert main(["generate", str(stories260k), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    (plain,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert plain["prompt"] == "User: x\nAssistant:"
    # nothing to continue: exit 2 with the reason
    assert main(["generate", cfg.output_dir]) == 2
    assert "nothing to generate from" in capsys.readouterr().err


def _prompts_shown(out: str) -> list[str]:
    import ast

    # each follows the "> " that asked for the turn (a pipe does not echo the input)
    return [ast.literal_eval(line.split("[prompt] ", 1)[1]) for line in out.splitlines() if "[prompt] " in line]


def test_chat_through_a_pipe_renders_every_turn_as_training_did(tmp_path, stories260k):
    import subprocess
    import sys

    rows = [{"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in QA]
    cfg = _run(tmp_path, stories260k, "chat", rows, data={"chat_template": CHATML})
    script = "\n".join(["/system Answer in one word.", QA[0]["question"], "And the grass?", "/reset", QA[2]["question"],
                        "/quit", "never read"]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "tunelab", "chat", cfg.output_dir, "--show-prompt", "--max-new-tokens",
                           "5"], input=script, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, third = _prompts_shown(proc.stdout)
    em = load_for_eval(cfg.output_dir)
    ids = encode_prompts(em.tokenizer, [first, third])
    assert ids[0] == _training_prompt_ids(cfg, 0, em.tokenizer)  # system + the sky question, as in training row 0
    assert ids[1] == _training_prompt_ids(cfg, 2, em.tokenizer)  # after /reset: only the system prompt stays
    reply = generate(em, [first], 5)[0].text.strip()
    assert reply in proc.stdout  # streamed as it was generated
    assert second.startswith(first) and f"{reply}<|im_end|>" in second and second.endswith(
        "<|im_start|>user\nAnd the grass?<|im_end|>\n<|im_start|>assistant\n")
    assert "(conversation cleared)" in proc.stdout and "never read" not in proc.stdout


def test_chat_with_a_template_run_joins_turns_as_demonstrations(tmp_path, stories260k):
    import io

    from tunelab.evaluate.chat import chat_loop

    cfg = _run(tmp_path, stories260k, "qa", QA, data={"columns": {"prompt": "question", "completion": "answer"}},
               strategy={"name": "full", "template": {"prompt": "Q: {prompt}\nA:", "target": " {completion}"}})
    em = load_for_eval(cfg.output_dir)
    out = io.StringIO()
    assert chat_loop(em, Inputs(em.run_config), io.StringIO("Hi\nAnd you?\n"), out, max_new_tokens=4,
                     show_prompt=True) == 2
    first, second = _prompts_shown(out.getvalue())
    reply = generate(em, [first], 4)[0].text.strip()
    assert first == "Q: Hi\nA:" and second == f"Q: Hi\nA: {reply}\n\nQ: And you?\nA:"


def test_chat_in_a_terminal(tmp_path, stories260k):
    """The same command in a real terminal (tmux), as a user types into it."""
    import shutil
    import subprocess
    import sys
    import time

    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    cfg = _run(tmp_path, stories260k, "qa", QA, data={"columns": {"prompt": "question", "completion": "answer"}},
               strategy={"name": "full", "template": {"prompt": "Q: {prompt}\nA:", "target": " {completion}"}})
    session = f"tunelab-chat-{tmp_path.name}"
    cmd = f"HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 {sys.executable} -m tunelab chat {cfg.output_dir} --max-new-tokens 4"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)
    try:
        def pane() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        def wait_for(predicate, what: str) -> str:
            deadline = time.monotonic() + 120  # generous: start-up on a busy machine
            while time.monotonic() < deadline:
                text = pane()
                if predicate(text):
                    return text
                time.sleep(0.2)
            raise AssertionError(f"{what} never appeared:\n{pane()}")

        wait_for(lambda t: "tunelab chat:" in t and t.rstrip().endswith(">"), "the first '> '")
        subprocess.run(["tmux", "send-keys", "-t", session, "What colour is the sea?", "Enter"], check=True)
        # (tmux drops a line's trailing spaces: the waiting prompt shows as ">")
        text = wait_for(lambda t: sum(line.startswith(">") for line in t.splitlines()) >= 2,
                        "the reply and the next '> '")
        em = load_for_eval(cfg.output_dir)
        reply = generate(em, ["Q: What colour is the sea?\nA:"], 4)[0].text.strip()
        assert reply.split("\n")[0].strip() in text
        subprocess.run(["tmux", "send-keys", "-t", session, "/quit", "Enter"], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(["tmux", "has-session", "-t", session],
                                                             capture_output=True).returncode == 0:
            time.sleep(0.2)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0  # exited
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_chat_with_a_plain_model_uses_its_own_chat_template(tmp_path, monkeypatch, capsys):
    """A model folder, not a run: each turn is rendered by the model's own chat template (the text transformers'
    apply_chat_template gives), and a reply ends at the template's end of turn."""
    import io

    import torch
    import transformers as T

    from tests.tokenizer_layouts import byte_level

    tok = byte_level("<|im_end|>", extra=["<|im_start|>", "<|im_end|>"], pad="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setattr("sys.stdin", io.StringIO("How are you?\n/system Be brief.\nAnd then?\n/quit\n"))
    assert main(["chat", str(tmp_path / "model"), "--show-prompt", "--max-new-tokens", "3"]) == 0
    first, second = _prompts_shown(capsys.readouterr().out)
    user = [{"role": "user", "content": "How are you?"}]
    assert first == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    em = load_for_eval(str(tmp_path / "model"))
    reply = generate(em, [first], 3)[0].text.strip()
    later = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": reply},
             {"role": "user", "content": "And then?"}]
    assert second == tok.apply_chat_template(later, add_generation_prompt=True, tokenize=False)
