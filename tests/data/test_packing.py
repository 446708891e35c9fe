"""Packing: best-fit-decreasing bins, and packed rows that behave exactly like separate examples."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.data.test_encode_labels import _encode
from tunelab.data.batching import UnitStream, count_label_tokens, pack_best_fit, packed_collate, packed_rows, pad_collate
from tunelab.models.attention import packed_inputs
from tunelab.train.loss import causal_lm_loss

ROWS = [
    {"prompt": "Once upon a time there was a dog named Max.", "completion": " He liked to run."},
    {"prompt": "Lily", "completion": " went to the park with her mom and saw a big red ball."},
    {"prompt": "The sun was hot. " * 4, "completion": " The end."},
    {"prompt": "Tom had a toy car.", "completion": " It was red and fast and he loved it very much."},
    {"prompt": "A bird", "completion": " sang."},
]


def test_best_fit_decreasing_packs_every_index_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= 11 / 9 * lower_bound + 1  # BFD's worst-case guarantee (Dosa 2007)
    assert pack_best_fit(lengths, 128) == bins
    assert pack_best_fit([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]  # 5 then 4 open bins; 3 fits best in 5's
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_best_fit([9], 8)


def test_each_epoch_covers_every_example_once():
    lengths = [random.Random(i).randint(1, 60) for i in range(200)]
    stream = UnitStream(packed_rows(lengths, 64, seed=1))
    epoch0 = stream.units(0)
    assert sorted(i for row in epoch0 for i in row) == list(range(200))
    assert stream.units(1) != epoch0  # a fresh packing and order each epoch
    taken = stream.take(len(epoch0) + 2)
    assert taken[: len(epoch0)] == epoch0 and stream.position.epoch == 1 and stream.position.index == 2


def _packed_and_padded(tokenizer):
    encoded = _encode(ROWS, tokenizer)[2]
    bins = pack_best_fit([len(e.input_ids) for e in encoded], 64)
    assert any(len(b) > 1 for b in bins)
    packed = packed_collate([[encoded[i] for i in b] for b in bins], tokenizer.eos_token_id, 64)
    padded = pad_collate(encoded, tokenizer.eos_token_id)
    return encoded, bins, packed, padded


# tunelab_varlen has two paths: a block-diagonal mask for short rows, one SDPA call per example for long ones
ATTENTION = ["tunelab_varlen", "tunelab_varlen-per-example", "sdpa", "eager"]


def _model(path, attn, monkeypatch):
    import tunelab.models.attention as attention

    if attn.endswith("-per-example"):
        monkeypatch.setattr(attention, "DENSE_MASK_MAX_ROW", 0)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn.split("-")[0])


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(stories260k, tokenizer, attn, monkeypatch):
    model = _model(stories260k, attn, monkeypatch)
    _, _, packed, padded = _packed_and_padded(tokenizer)
    assert count_label_tokens(packed["labels"]) == count_label_tokens(padded["labels"])
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = causal_lm_loss(model, batch)
        (out.loss_sum / out.num_label_tokens).backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_pad, grads_pad), (loss_pack, grads_pack) = results
    torch.testing.assert_close(loss_pack, loss_pad)
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, msg=name)


@pytest.mark.parametrize("attn", ATTENTION)
def test_changing_one_packed_example_leaves_the_others_unchanged(stories260k, tokenizer, attn, monkeypatch):
    model = _model(stories260k, attn, monkeypatch)
    encoded, bins, packed, _ = _packed_and_padded(tokenizer)
    row = next(r for r, b in enumerate(bins) if len(b) >= 2)
    spans, start = [], 0
    for i in bins[row]:
        spans.append((start, start + len(encoded[i].input_ids)))
        start += len(encoded[i].input_ids)
    # the model inputs exactly as the training loss builds them for this attention implementation
    # (use_cache=False: transformers reads packed position ids only when no KV cache is built)
    inputs = {**packed_inputs({k: v[row : row + 1] for k, v in packed.items()}, attn.split("-")[0]), "use_cache": False}
    before = model(**inputs).logits
    changed = inputs["input_ids"].clone()
    s, e = spans[0]
    changed[0, s + 1 : e] = torch.randint(3, 512, (e - s - 1,), generator=torch.Generator().manual_seed(0))
    after = model(**{**inputs, "input_ids": changed}).logits
    assert not torch.allclose(after[0, s + 1 : e], before[0, s + 1 : e])  # the changed example did change
    for s2, e2 in spans[1:]:
        torch.testing.assert_close(after[0, s2:e2], before[0, s2:e2], rtol=0, atol=1e-6)
    # and each packed example's logits equal the example run on its own
    for i, (s2, e2) in zip(bins[row], spans):
        alone = model(input_ids=torch.tensor([encoded[i].input_ids])).logits
        torch.testing.assert_close(before[0, s2:e2], alone[0], rtol=1e-5, atol=1e-5)
