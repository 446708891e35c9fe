"""LoRA's lean dropout (tunelab/strategies/lora_dropout.py) against peft's own path: with the same mask, the adapter's
output and every gradient equal `lora_B(lora_A(dropout(x))) * scaling`; the masks drop at the rate asked for,
independently in each layer; eval mode drops nothing; the saved adapter is peft's; DoRA keeps peft's dropout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.strategies.lora_dropout import DroppedLinear, drop_threshold, keep_mask, lean_lora_dropout


def _model(dropout: float, use_dora: bool = False):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", use_dora=use_dora,
                        init_lora_weights=False)  # B not zero: the adapter's output and A's gradient are not zero
    return get_peft_model(base, config)


def test_the_mask_drops_at_the_rate_asked_and_its_bits_are_uniform():
    torch.manual_seed(1)
    threshold, scale = drop_threshold(0.05)
    keep = keep_mask(torch.Size([1000, 1000]), threshold, torch.device("cpu"))
    assert keep.dtype == torch.bool
    assert abs((1 - keep.float().mean().item()) - 0.05) < 0.002  # 1e6 draws: the standard error is 0.0002
    assert scale == pytest.approx(1 / (1 - 0.05), rel=1e-4)
    for lane in range(4):  # each of a 64-bit draw's four 16-bit lanes drops at the same rate
        assert abs((1 - keep.view(-1)[lane::4].float().mean().item()) - 0.05) < 0.004, lane
    again = keep_mask(torch.Size([1000, 1000]), threshold, torch.device("cpu"))
    assert (keep != again).any()  # a fresh mask for every call


def test_output_and_gradients_equal_peft_with_the_same_mask(monkeypatch):
    peft_model, lean = _model(0.1), _model(0.1)
    assert lean_lora_dropout(lean) == 14  # 7 linear layers in each of 2 layers
    layer = lean.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], DroppedLinear) and isinstance(layer.lora_dropout["default"],
                                                                            torch.nn.Identity)
    assert lean.state_dict().keys() == peft_model.state_dict().keys()
    ids = torch.randint(0, 256, (2, 12))

    # the same masks on both sides: peft's nn.Dropout replays the masks the lean layers drew
    masks: list[torch.Tensor] = []
    real_keep = keep_mask

    def recording(*args):
        masks.append(real_keep(*args))
        return masks[-1]

    monkeypatch.setattr("tunelab.strategies.lora_dropout.keep_mask", recording)
    threshold, scale = drop_threshold(0.1)
    lean.train()
    lean_loss = lean(input_ids=ids, labels=ids).loss
    lean_loss.backward()
    assert len(masks) == 14 and not all(torch.equal(masks[0], m) for m in masks[1:] if m.shape == masks[0].shape)

    replay = iter(masks)
    for module in peft_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.forward = lambda x: x * next(replay) * scale
    peft_model.train()
    peft_loss = peft_model(input_ids=ids, labels=ids).loss
    peft_loss.backward()
    torch.testing.assert_close(lean_loss, peft_loss, rtol=1e-6, atol=0)
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(grads) == 28
    for name, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)


def test_eval_mode_drops_nothing():
    plain, lean = _model(0.5), _model(0.5)
    lean_lora_dropout(lean)
    ids = torch.randint(0, 256, (1, 10))
    plain.eval()
    lean.eval()
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_dora_and_no_dropout_keep_peft_layers():
    assert lean_lora_dropout(_model(0.1, use_dora=True)) == 0  # DoRA's variant reads lora_dropout itself
    assert lean_lora_dropout(_model(0.0)) == 0  # nothing to drop: peft's Identity stays
