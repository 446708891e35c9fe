"""Generation and option scoring against transformers' own outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import VARIED_ROWS
from tunelab.data.encode import EncodeStats, encode_examples
from tunelab.data.read import Record
from tunelab.data.records import to_examples
from tunelab.data.render import RenderSpec, render_example
from tunelab.evaluate.generate import encode_prompts, generate
from tunelab.evaluate.loaders import load_for_eval
from tunelab.evaluate.score import rank_options, sequence_log_probs

PROMPTS = ["Once upon a time", "Tom had a big red", "The sun", "Lily and her mom went to the park. They saw"]


def test_batched_left_padded_generation_equals_one_at_a_time(stories260k):
    em = load_for_eval(str(stories260k))
    batched = generate(em, PROMPTS, max_new_tokens=20, batch_size=4)
    for prompt, g in zip(PROMPTS, batched):
        ids = torch.tensor(encode_prompts(em.tokenizer, [prompt]))
        ref = em.model.lm.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2)
        new = ref[0, ids.shape[1]:].tolist()
        assert g.ended_with_eos == (2 in new)
        if 2 in new:
            new = new[: new.index(2)]
        assert g.text == em.tokenizer.decode(new, skip_special_tokens=True)
        assert g.num_tokens == len(new)


def test_stop_strings_cut_the_text(stories260k):
    em = load_for_eval(str(stories260k))
    full = generate(em, ["Once upon a time"], max_new_tokens=30)[0].text
    assert "." in full
    cut = generate(em, ["Once upon a time"], max_new_tokens=30, stop_strings=["."])[0].text
    assert cut == full[: full.index(".")]


def test_sequence_log_probs_match_the_logits(stories260k, tokenizer):
    em = load_for_eval(str(stories260k))
    examples = to_examples([Record(r, f"t:{i}", i) for i, r in enumerate(VARIED_ROWS[:7])])
    encoded = encode_examples([render_example(e, RenderSpec(), tokenizer) for e in examples], tokenizer, 256)
    lengths = [len(e.input_ids) for e in encoded]
    assert lengths != sorted(lengths)  # batched in length order, returned in this order
    scored = sequence_log_probs(em.model, encoded, pad_id=2, batch_size=3)
    for enc, (total, n) in zip(encoded, scored):
        logits = em.model.lm(torch.tensor([enc.input_ids])).logits[0, :-1]
        labels = torch.tensor(enc.labels[1:])
        keep = labels != -100
        expected = F.log_softmax(logits[keep].double(), -1).gather(1, labels[keep][:, None]).sum()
        assert n == int(keep.sum())
        assert abs(total - float(expected)) < 1e-3


def test_rank_options_takes_the_best_mean_log_probability(stories260k, tokenizer):
    em = load_for_eval(str(stories260k))
    rows = [{"text": "The dog ran to the park", "label": "happy"}, {"text": "Lily cried", "label": "sad"}]
    examples = to_examples([Record(r, f"t:{i}", i) for i, r in enumerate(rows)])
    options = ["happy", "sad", "a big red ball"]
    ranked = rank_options(em.model, tokenizer, examples, options, RenderSpec(), [], 128)
    for ex, (best, scores) in zip(examples, ranked):
        manual = []
        for opt in options:
            variant = to_examples([Record({"text": ex.fields["text"], "label": opt}, "v", 0)])[0]
            enc = encode_examples([render_example(variant, RenderSpec(), tokenizer)], tokenizer, 128, "left",
                                  EncodeStats())[0]
            total, n = sequence_log_probs(em.model, [enc], pad_id=2)[0]
            manual.append(total / n)
        assert [round(s, 4) for s in scores] == [round(m, 4) for m in manual]
        assert best == options[max(range(3), key=manual.__getitem__)]


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_generation_with_a_soft_prompt_is_greedy_decoding_of_the_trained_forward(method, stories260k, tmp_path):
    """What eval generates with a soft prompt is what the model trained: greedy generation (batched, left-padded,
    KV cache) equals argmax decoding through peft's own forward without a cache, and differs from the base model's
    generation (peft's generate once dropped a prefix silently under transformers 5)."""
    from tests.conftest import config_tree, write_jsonl
    from tunelab.config import validate_config
    from tunelab.train.loop import train

    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "soft_prompt", "soft_prompt": {"method": method, "num_virtual_tokens": 4}},
                       train={"max_steps": 1})
    train(validate_config(tree))
    em = load_for_eval(str(tmp_path / "run"))
    torch.manual_seed(0)
    with torch.no_grad():  # a prompt far from anything the base would do by itself
        for p in em.model.lm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * p.detach().std() * 3)
    got = generate(em, PROMPTS, max_new_tokens=8, batch_size=4)
    base = generate(load_for_eval(str(stories260k)), PROMPTS, max_new_tokens=8, batch_size=4)
    for prompt, g in zip(PROMPTS, got):
        ids = torch.tensor(encode_prompts(em.tokenizer, [prompt]))
        new: list[int] = []
        with torch.no_grad():
            for _ in range(8):
                cur = torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)
                nxt = int(em.model.lm(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[0, -1].argmax())
                if nxt == em.tokenizer.eos_token_id:
                    break
                new.append(nxt)
        assert g.text == em.tokenizer.decode(new, skip_special_tokens=True), prompt
    assert [g.text for g in got] != [b.text for b in base]
