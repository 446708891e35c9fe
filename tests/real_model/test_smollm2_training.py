"""Every training strategy on a real chat model: SmolLM2-135M-Instruct (30 layers, a 49,152-token vocabulary, the
ChatML template with its default system turn, pad equal to EOS), 2 steps of batch 2 on banking77 rows written as
chat (the customer's message, the intent as the reply).

For each strategy: the step-1 loss equals the loss transformers (peft for the added parts) computes on the same
conversations with an assistant mask derived here from apply_chat_template alone; final/ loads with plain
transformers/peft; `tunelab eval` generates what plain greedy decoding of final/ gives and stops at <|im_end|>.
Once: tunelab's encoding trains every assistant turn's <|im_end|> (pad is EOS here) and nothing else;
`generate` and `chat` prompt with exactly apply_chat_template(..., add_generation_prompt=True); a copy of the
folder without its chat template is refused for chat data instead of given the User:/Assistant: fallback.

Kept short for `make test` on a 2-core CPU: two conversations, one base model loaded for all the references
(each strategy's reference is a copy), one tokenizer, each run trained once."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import config_tree, shared_file, write_jsonl
from tests.evaluate.test_generate_cli import _prompts_shown
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.data.batching import pad_collate
from tunelab.data.dataset import load_datasets
from tunelab.data.encode import IGNORE
from tunelab.data.render import spec_from_config
from tunelab.strategies.final import load_final
from tunelab.strategies.prepare import prepare_strategy
from tunelab.train.loop import train
from tunelab.train.session import seed_everything
from tunelab.runfiles import read_metrics

pytestmark = pytest.mark.slow  # a real 135M-parameter model (`make test-fast` leaves it out)

INTENT_PROMPT = "Label this message: {text}"  # fixed_prompt's template (its user turn)
WEIGHTS_LR, ADAPTER_LR, PROMPT_LR = 1e-5, 1e-4, 1e-3
# name: (strategy section, learning rate). fixed_prompt tunes LoRA under its template (tune: all is full's path).
STRATEGIES = {
    "full": ({"name": "full"}, WEIGHTS_LR),
    "lora": ({"name": "lora", "lora": {"dropout": 0.0}}, ADAPTER_LR),
    # DoRA on the attention's q and v only: peft's DoRA recomputes each adapted weight's norm in every forward, which
    # on all 210 linear layers (1.5 s a forward on one CPU thread) would make it the slowest strategy here
    "dora": ({"name": "lora", "lora": {"dropout": 0.0, "variant": "dora", "target_modules": ["q_proj", "v_proj"]}},
             ADAPTER_LR),
    "ia3": ({"name": "ia3"}, PROMPT_LR),
    "freeze": ({"name": "freeze", "freeze": {"trainable_layers": 2}}, WEIGHTS_LR),
    "fixed_prompt": ({"name": "fixed_prompt", "fixed_prompt": {"tune": "lora"}, "lora": {"dropout": 0.0},
                      "template": {"prompt": INTENT_PROMPT, "target": "{label}"}}, ADAPTER_LR),
    "prompt_tuning": ({"name": "soft_prompt", "soft_prompt": {"method": "prompt_tuning", "num_virtual_tokens": 4}},
                      PROMPT_LR),
    "p_tuning": ({"name": "soft_prompt", "soft_prompt": {"method": "p_tuning", "num_virtual_tokens": 4}}, PROMPT_LR),
    "prefix_tuning": ({"name": "soft_prompt", "soft_prompt": {"method": "prefix_tuning", "num_virtual_tokens": 4}},
                      PROMPT_LR),
    "prompt_lm": ({"name": "prompt_lm", "soft_prompt": {"num_virtual_tokens": 4}}, WEIGHTS_LR),
}
# a question the model answers in a few tokens and an <|im_end|>, so that generation can be seen to stop there
EVAL_CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
MAX_NEW_TOKENS = 12


def _banking77_rows() -> list[dict[str, str]]:
    with shared_file("banking77/train.csv").open(newline="") as fh:
        return list(itertools.islice(csv.DictReader(fh), 3))


def _conversations(rows: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """One single-turn conversation (the template adds its default system turn) and one of two turns."""
    def turn(row):
        return [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": row["category"]}]

    return [turn(rows[0]), turn(rows[1]) + turn(rows[2])]


def reference_encoding(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The conversation's ids and labels, derived from apply_chat_template alone: each assistant turn's tokens
    start where the generation prompt of the conversation before it ends, and are its content and <|im_end|>."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(tokenizer.apply_chat_template(messages, tokenize=False))
    labels = [IGNORE] * len(full)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(ids(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)))
            turn = ids(message["content"]) + [end]
            assert full[start : start + len(turn)] == turn, (messages, i)
            labels[start : start + len(turn)] = turn
    return full, labels


def reference_batch(tokenizer, conversations) -> dict[str, torch.Tensor]:
    """The conversations right-padded with the pad id (EOS here), the padding masked out of attention and loss."""
    encoded = [reference_encoding(tokenizer, c) for c in conversations]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded]),
            "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in encoded])}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The chat rows, the same rows as a banking77-style CSV (for fixed_prompt's template) and the eval chat."""
    folder = tmp_path_factory.mktemp("smollm2-data")
    rows = _banking77_rows()
    chats = _conversations(rows)
    with (folder / "intents.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "category"])
        writer.writeheader()
        writer.writerows(rows[:2])
    fixed = [[{"role": "user", "content": INTENT_PROMPT.format(text=r["text"])},
              {"role": "assistant", "content": r["category"]}] for r in rows[:2]]
    question, answer = EVAL_CHAT[0]["content"], EVAL_CHAT[1]["content"]
    (folder / "eval.csv").write_text(f"text,category\n{question},{answer}\n")
    return {"chat": write_jsonl(folder / "chats.jsonl", [{"messages": c} for c in chats]), "chat_rows": chats,
            "csv": folder / "intents.csv", "csv_rows": fixed,
            "eval": write_jsonl(folder / "eval.jsonl", [{"messages": EVAL_CHAT}]), "eval_chat": EVAL_CHAT[:1],
            "csv_eval": folder / "eval.csv",
            "fixed_eval_chat": [{"role": "user", "content": INTENT_PROMPT.format(text=question)}]}


def _config(name: str, model: Path, data: dict, out: Path):
    strategy, lr = STRATEGIES[name]
    sections = {"data": {"max_length": 128}}
    if name == "fixed_prompt":
        sections["data"].update(render="chat", columns={"label": "category"})
    tree = config_tree(model, data["csv" if name == "fixed_prompt" else "chat"], out / name, strategy=strategy,
                       train={"max_steps": 2, "batch_size": 2, "learning_rate": lr}, **sections)
    return validate_config(tree)


@pytest.fixture(scope="module")
def run_of(smollm2, data, tmp_path_factory):
    """A function: the config of a strategy's run, trained the first time it is asked for."""
    out, done = tmp_path_factory.mktemp("smollm2-runs"), {}

    def run(name: str):
        if name not in done:
            cfg = _config(name, smollm2, data, out)
            train(cfg)
            done[name] = cfg
        return done[name]

    return run


@pytest.fixture(scope="module")
def base_model(smollm2):
    """The base model as plain transformers loads it (float32, its default attention): each reference is a copy."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)


def test_every_assistant_turn_trains_its_content_and_im_end(smollm2, smollm2_tokenizer, data, tmp_path):
    """pad == EOS == <|im_end|>: tunelab's encoding and padded batch still train each turn's <|im_end|>."""
    tok = smollm2_tokenizer
    for name, rows in [("lora", data["chat_rows"]), ("fixed_prompt", data["csv_rows"])]:
        cfg = _config(name, smollm2, data, tmp_path)
        encoded = load_datasets(cfg.data, spec_from_config(cfg), tok, cfg.train.seed)[0].encoded
        assert [(e.input_ids, e.labels) for e in encoded] == [reference_encoding(tok, r) for r in rows], name
        batch = pad_collate(encoded, tok.pad_token_id)
        expected = reference_batch(tok, rows)
        assert torch.equal(batch["labels"], expected["labels"]) and torch.equal(batch["input_ids"],
                                                                              expected["input_ids"])
        ends = sum(m["role"] == "assistant" for r in rows for m in r)
        assert int((batch["labels"] == tok.convert_tokens_to_ids("<|im_end|>")).sum()) == ends
        assert "<|im_start|>system\nYou are a helpful AI assistant" in tok.decode(encoded[0].input_ids)


def _step1_reference(name: str, cfg, base_model, tokenizer, rows) -> float:
    """transformers' (peft's, for an added part) loss of the strategy's model as step 1 sees it, on `rows`."""
    seed_everything(cfg.train.seed)
    model = prepare_strategy(copy.deepcopy(base_model), cfg.strategy, tokenizer, cfg.train.seed)
    model.train()  # as step 1 runs it (no dropout anywhere in these settings)
    with torch.no_grad():
        return float(model.lm(**reference_batch(tokenizer, rows)).loss)


def _plain_greedy(final, tokenizer, question: list[dict[str, str]]) -> list[int]:
    """Greedy decoding of the question by final/ as plain transformers/peft loaded it, up to <|im_end|>.

    A soft prompt is decoded by its model's forward over the whole sequence at each step: peft's own generate
    garbles prompt tuning and P-tuning after the first tokens when it uses the KV cache, and prefix tuning when it
    does not (peft 0.21 with transformers 5.25; peft issue #1391 is the same symptom)."""
    ids = tokenizer(tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    final.eval()
    with torch.no_grad():
        if not getattr(getattr(final, "active_peft_config", None), "is_prompt_learning", False):
            out = final.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, eos_token_id=end, pad_token_id=end)
            return out[0, ids.shape[1]:].tolist()
        new: list[int] = []
        while len(new) < MAX_NEW_TOKENS and end not in new:
            logits = final(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, seq, vocab)
            new.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
        return new


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy(name, run_of, base_model, smollm2_tokenizer, data, tmp_path, capsys):
    tok = smollm2_tokenizer
    cfg = run_of(name)
    rows = data["csv_rows" if name == "fixed_prompt" else "chat_rows"]
    first = next(r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["type"] == "train")
    assert first["step"] == 1
    assert first["num_label_tokens"] == int((reference_batch(tok, rows)["labels"] != IGNORE).sum())
    assert first["loss"] == pytest.approx(_step1_reference(name, cfg, base_model, tok, rows), rel=2e-5)

    final = load_final(Path(cfg.output_dir) / "final")  # plain transformers / peft
    lm = final.get_base_model() if hasattr(final, "get_base_model") else final
    ends = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert lm.generation_config.eos_token_id == ends, name  # a saved model keeps every end id of its base
    greedy = _plain_greedy(final, tok, data["fixed_eval_chat" if name == "fixed_prompt" else "eval_chat"])
    del final
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in greedy, (name, tok.decode(greedy))  # the model answers and closes its turn
    answer = greedy[: greedy.index(end)]
    predictions = tmp_path / "predictions.jsonl"
    eval_file = data["csv_eval" if name == "fixed_prompt" else "eval"]
    assert main(["eval", cfg.output_dir, str(eval_file), "--mode", "generate", "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--predictions", str(predictions)]) == 0, capsys.readouterr().err[-2000:]
    (row,) = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert row["ended_with_eos"] and row["num_tokens"] == len(answer), (name, row)
    assert row["prediction"] == tok.decode(answer, skip_special_tokens=True).strip(), name


def test_generate_and_chat_prompt_with_the_chat_template(smollm2, run_of, smollm2_tokenizer, tmp_path, monkeypatch,
                                                         capsys):
    """A chat-trained run and the plain model folder: the prompt ids are apply_chat_template's, default system
    turn included."""
    tok = smollm2_tokenizer

    def template_ids(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"]

    question = "I still have not received my new card, what should I do?"
    run = run_of("lora").output_dir
    for target in (run, str(smollm2)):
        out = tmp_path / "generated.jsonl"
        assert main(["generate", target, "--prompt", question, "--max-new-tokens", "2", "--output", str(out)]) == 0
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert tok(row["prompt"], add_special_tokens=False)["input_ids"] == template_ids(
            [{"role": "user", "content": question}]), target
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\nAnd how long will it take?\n/quit\n"))
    assert main(["chat", run, "--show-prompt", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    first, second = _prompts_shown(out)
    user = [{"role": "user", "content": question}]
    assert tok(first, add_special_tokens=False)["input_ids"] == template_ids(user)
    reply = second[len(first):].split("<|im_end|>", 1)[0]
    later = [*user, {"role": "assistant", "content": reply}, {"role": "user", "content": "And how long will it take?"}]
    assert tok(second, add_special_tokens=False)["input_ids"] == template_ids(later)


def test_a_folder_without_its_chat_template_is_refused_for_chat_data(smollm2, data, tmp_path, capsys):
    """The folder's tokenizer lost its chat template but keeps ChatML's turn tokens: chat data exits 2 naming the
    template to set (not the User:/Assistant: fallback), and nothing is written."""
    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in smollm2.iterdir():
        if f.name == "model.safetensors":
            (folder / f.name).symlink_to(f)
        elif f.name != "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tree = config_tree(folder, data["chat"], tmp_path / "run", train={"max_steps": 2})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    code = main(["train", str(tmp_path / "config.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "chats.jsonl" in err and "<|im_start|>" in err and "data.chat_template" in err and "ChatML" in err, err
    assert not (tmp_path / "run").exists()


def test_forgetting_figures_score_the_same_tokens_as_the_base(smollm2, run_of):
    """SmolLM2's tokenizer adds no BOS: the diff's reference texts start with a real token, which a soft prompt's
    virtual tokens would predict and the base cannot. Base and prompt-tuned model score the same tokens (KL is
    taken position by position), and with the prompt off the figures are the base's exactly."""
    from tunelab.evaluate.diff import mean_kl, perplexity
    from tunelab.evaluate.loaders import adaptation_off, load_for_eval

    texts = [" ".join(f"Paris is the capital of France, and sentence {i} says so again." for i in range(8)),
             "A short one."]
    base, tuned = load_for_eval(str(smollm2)), load_for_eval(run_of("prompt_tuning").output_dir)
    assert mean_kl(base, tuned, texts) > 0 and perplexity(tuned, texts) != perplexity(base, texts)
    with adaptation_off(tuned) as off:
        assert mean_kl(base, off, texts) == 0.0 and perplexity(off, texts) == perplexity(base, texts)
