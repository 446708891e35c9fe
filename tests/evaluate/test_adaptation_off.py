"""A strategy that keeps the base weights (soft prompts, LoRA) gives back the base model exactly when its
adaptation comes off: the diff's "base behaviour with it off" figure rests on this."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.data.batching import pad_collate
from tunelab.data.encode import encode_examples
from tunelab.data.render import Rendered
from tunelab.evaluate.loaders import adaptation_off, load_for_eval
from tunelab.models.head import target_positions
from tunelab.train.loop import train

STRATEGIES = {"lora": {"name": "lora"},
              "prompt_tuning": {"name": "soft_prompt", "soft_prompt": {"method": "prompt_tuning"}},
              "p_tuning": {"name": "soft_prompt", "soft_prompt": {"method": "p_tuning"}},
              "prefix_tuning": {"name": "soft_prompt", "soft_prompt": {"method": "prefix_tuning"}}}


def _logits(em, texts):
    encoded = encode_examples([Rendered(t, [(0, len(t))], "x", i) for i, t in enumerate(texts)], em.tokenizer, 64)
    batch = pad_collate(encoded, 0, em.model.virtual_tokens)
    with torch.no_grad():  # the logits at every trained position, as the loss and the scoring see them
        return em.model.head.logits(target_positions(*em.model.hidden_states(batch)).hidden)  # (tokens, vocab)


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_adaptation_off_is_the_base_model_exactly(kind, stories260k, tmp_path):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy=STRATEGIES[kind], train={"max_steps": 2, "learning_rate": 5e-2})
    train(validate_config(tree))
    tuned, base = load_for_eval(str(tmp_path / "run")), load_for_eval(str(stories260k))
    assert tuned.detachable and not base.detachable
    texts = [r["prompt"][:60] + r["completion"] for r in VARIED_ROWS[:4]]
    with adaptation_off(tuned) as off:
        assert off.model.virtual_tokens == 0 and not off.model.prefix
        assert torch.equal(_logits(off, texts), _logits(base, texts))  # exactly, not within a tolerance
    # the adaptation is back on after the block, and it does change the model
    on = _logits(tuned, texts)
    ref = _logits(base, texts)
    assert on.shape == ref.shape and not torch.allclose(on, ref, atol=1e-3)


def test_full_tuning_has_no_adaptation_to_take_off(stories260k, tmp_path):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run")
    train(validate_config(tree))
    tuned = load_for_eval(str(tmp_path / "run"))
    assert not tuned.detachable
    with pytest.raises(ValueError, match="does not come off"):
        with adaptation_off(tuned):
            pass


def test_an_adapter_over_a_bf16_saved_base_is_evaluated_in_float32(tmp_path):
    """The demo's base model is saved in bf16 (its config says so): training holds float32 weights, and the
    evaluation of its LoRA run must too (transformers' default would load the base in bf16), so that with the
    adapter off it is the base exactly."""
    from tunelab.demo_world.build import MODEL_DIR

    tree = config_tree(MODEL_DIR, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "lora"}, train={"max_steps": 1})
    train(validate_config(tree))
    tuned, base = load_for_eval(str(tmp_path / "run")), load_for_eval(str(MODEL_DIR))
    assert {p.dtype for p in tuned.model.parameters()} == {torch.float32} == {p.dtype for p in base.model.parameters()}
    texts = [r["prompt"][:60] + r["completion"] for r in VARIED_ROWS[:4]]
    with adaptation_off(tuned) as off:
        assert torch.equal(_logits(off, texts), _logits(base, texts))


def test_prompt_plus_lm_tuning_has_no_base_to_detach_back_to(stories260k, tmp_path):
    """prompt+LM tuning trains the base weights too: neither its run nor its adapter folder (over final/base, the
    tuned weights) counts as detachable, so the diff never calls its adaptation-off model the base."""
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       strategy={"name": "prompt_lm"}, train={"max_steps": 1})
    train(validate_config(tree))
    assert not load_for_eval(str(tmp_path / "run")).detachable
    assert not load_for_eval(str(tmp_path / "run" / "final" / "adapter")).detachable


def test_bf16_evaluation_keeps_the_rope_frequencies_in_float32(stories260k):
    """Only the weights go to bf16: a buffer such as RoPE's inverse frequencies keeps its precision."""
    em = load_for_eval(str(stories260k), device="cpu", precision="bf16")
    buffers = {name: b.dtype for name, b in em.model.named_buffers() if b.is_floating_point()}
    assert buffers and set(buffers.values()) == {torch.float32}, buffers
    assert {p.dtype for p in em.model.parameters()} == {torch.bfloat16}
