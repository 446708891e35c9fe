"""tunelab's loss equals transformers' own loss, and the chunked projection equals plain cross-entropy."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.data.test_encode_labels import _encode
from tunelab.data.batching import count_label_tokens, pad_collate
from tunelab.models.linear_cross_entropy import linear_cross_entropy_sum
from tunelab.train.loss import causal_lm_loss

ROWS = [
    {"prompt": "Once upon a time there was a dog named Max.", "completion": " He liked to run."},
    {"prompt": "Lily", "completion": " went to the park with her mom and saw a big red ball."},
    {"prompt": "The sun was hot. " * 6, "completion": " The end."},
]


def _batch(tokenizer):
    encoded = _encode(ROWS, tokenizer)[2]
    return pad_collate(encoded, tokenizer.eos_token_id)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_against_transformers(model, batch):
    reference = model(**batch).loss  # transformers: mean over labeled, shifted positions
    ref_grads = _grads(model, reference)
    out = causal_lm_loss(model, batch, chunk_size=7)
    assert out.num_label_tokens == count_label_tokens(batch["labels"])
    ours = out.loss_sum / out.num_label_tokens
    torch.testing.assert_close(ours, reference)
    for name, grad in _grads(model, ours).items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def test_soft_capped_logits_equal_transformers(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, attn_implementation="eager")
    _check_against_transformers(Gemma2ForCausalLM(cfg), _batch(tokenizer))


def test_loss_and_gradients_equal_transformers(stories260k, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    _check_against_transformers(model, _batch(tokenizer))


def test_untied_head_gets_its_own_gradient(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    batch = _batch(tokenizer)
    reference = model(**batch).loss
    ref_grads = _grads(model, reference)
    out = causal_lm_loss(model, batch, chunk_size=5)
    grads = _grads(model, out.loss_sum / out.num_label_tokens)
    torch.testing.assert_close(grads["lm_head.weight"], ref_grads["lm_head.weight"])
    torch.testing.assert_close(grads["model.embed_tokens.weight"], ref_grads["model.embed_tokens.weight"])


def test_chunked_projection_equals_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t, reduction="sum")
    expected = torch.autograd.grad(reference * 3.0, (h, w, b))
    ours = linear_cross_entropy_sum(h, w, b, t, chunk_size=8)
    torch.testing.assert_close(ours, reference)
    for got, want in zip(torch.autograd.grad(ours * 3.0, (h, w, b)), expected):
        torch.testing.assert_close(got, want)
    small = [x[:11, :6].detach().clone().requires_grad_() for x in (h, w)] + [b[:13].detach().clone().requires_grad_()]
    small[1] = w[:13, :6].detach().clone().requires_grad_()
    ts = t[:11] % 13
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy_sum(h, w, b, ts, 4), small)


def test_frozen_head_gets_no_gradient_and_eval_counts_correct(stories260k, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(stories260k)
    model.lm_head.weight.requires_grad_(False)  # tied: the embedding is frozen too
    batch = _batch(tokenizer)
    out = causal_lm_loss(model, batch, count_correct=True)
    out.loss_sum.backward()
    assert model.lm_head.weight.grad is None
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    logits = model(**batch).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    assert out.num_correct == int((logits.argmax(-1)[mask] == batch["labels"][:, 1:][mask]).sum())
