"""Generation and option scoring against transformers' own outputs."""

from __future__ import annotations

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
