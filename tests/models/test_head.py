"""One head for training and evaluation: on architectures that change their logits (Cohere's logit_scale,
Gemma 2's final soft cap) or have a bias on the head (Phi), the evaluation's log-probabilities are the
training loss, and both are transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM

from tunelab.data.batching import pad_collate
from tunelab.data.encode import IGNORE, Encoded
from tunelab.evaluate.score import label_log_probs, sequence_log_probs
from tunelab.models.head import OutputHead, target_positions
from tunelab.strategies.model import TrainModel
from tunelab.train.loss import causal_lm_loss

VOCAB = 256
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _cohere() -> torch.nn.Module:
    return CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.5))


def _gemma2() -> torch.nn.Module:
    return Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0,
                                          attn_implementation="eager"))


def _phi() -> torch.nn.Module:
    model = PhiForCausalLM(PhiConfig(**SHAPE))
    torch.nn.init.normal_(model.get_output_embeddings().bias)  # transformers initialises it to zeros
    return model


MODELS = {"cohere logit_scale": _cohere, "gemma2 soft cap": _gemma2, "phi head bias": _phi}


def _examples() -> list[Encoded]:
    """Ragged examples whose prompt is masked and whose target is labeled (ids drawn at random)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for row, (prompt, target) in enumerate([(5, 4), (9, 7), (3, 2), (12, 6)]):
        ids = torch.randint(3, VOCAB, (prompt + target,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:], "test", row))
    return out


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


@torch.no_grad()
def test_eval_log_probs_equal_the_training_loss_and_transformers_loss(model):
    examples = _examples()
    batch = pad_collate(examples, pad_id=0)
    reference = model(**batch).loss  # transformers: mean over the shifted, labeled positions
    trained = causal_lm_loss(model, batch, chunk_size=5)
    torch.testing.assert_close(trained.loss_sum / trained.num_label_tokens, reference)

    scored = sequence_log_probs(TrainModel(model, "full"), examples, pad_id=0, batch_size=3)
    assert [n for _, n in scored] == [e.num_label_tokens for e in examples]
    assert sum(n for _, n in scored) == trained.num_label_tokens
    assert -sum(s for s, _ in scored) == pytest.approx(float(trained.loss_sum), rel=1e-5)
    for (logp, n), e in zip(scored, examples):  # each example on its own, through transformers
        alone = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
        assert -logp / n == pytest.approx(float(alone), rel=1e-5)


@torch.no_grad()
def test_label_log_probs_are_transformers_next_token_distributions(model):
    """The whole distribution (the diff's KL reads it), not only the labels' entries."""
    batch = pad_collate(_examples(), pad_id=0)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]  # (batch, seq - 1, vocab)
    mask = batch["labels"][:, 1:] != IGNORE
    expected = torch.log_softmax(logits[mask].float(), dim=-1)
    chunks = list(label_log_probs(TrainModel(model, "full"), batch, chunk=4))
    torch.testing.assert_close(torch.cat([lp for lp, _, _ in chunks]), expected)
    torch.testing.assert_close(torch.cat([t for _, t, _ in chunks]), batch["labels"][:, 1:][mask])
    rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    torch.testing.assert_close(torch.cat([r for _, _, r in chunks]), rows)


def test_the_head_is_read_from_the_model_and_its_config(model):
    head = OutputHead.of(model)
    assert head.projection is model.get_output_embeddings()
    config = model.config
    assert head.scale == getattr(config, "logit_scale", 1.0)
    assert head.soft_cap == getattr(config, "final_logit_softcapping", None)
    # the transforms matter here: without them the logits would differ from transformers'
    hidden = torch.randn(3, 32)
    assert head.is_plain_linear == (head.scale == 1.0 and head.soft_cap is None)
    if not head.is_plain_linear:
        assert not torch.allclose(head.logits(hidden), head.projection(hidden))


def test_target_positions_shift_and_mask():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 5, IGNORE, IGNORE]])
    at = target_positions(hidden, labels)
    assert at.targets.tolist() == [7, 8, 5]
    assert at.hidden.squeeze(1).tolist() == [1.0, 2.0, 4.0]  # the position before each target
    assert at.rows.tolist() == [0, 0, 1]
