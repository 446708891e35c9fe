"""bf16 autocast on the CPU (`train.precision: bf16`): the matrix products in bf16 (AMX runs them several times
faster than float32), attention in float32, and training that follows the float32 run."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.models.attention import BOUNDS_KWARG, varlen_attention
from tunelab.runfiles import read_metrics
from tunelab.train import loop


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _qkv(tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # as transformers hands them over under autocast: q and k float32 (after RoPE's float32 tables), v bf16
    q = torch.randn(1, 4, tokens, 16, generator=g)
    k = torch.randn(1, 2, tokens, 16, generator=g)
    v = torch.randn(1, 2, tokens, 16, generator=g).bfloat16()
    return [t.requires_grad_() for t in (q, k, v)]


def test_attention_under_cpu_autocast_runs_in_float32_with_its_gradients():
    """SDPA's CPU kernels in bf16 took 5x as long backward on SmolLM2; tunelab_varlen runs them in float32 under
    autocast: the same output and gradients as float32 SDPA outside autocast, on the padded and the packed path."""
    module = _Attention(groups=2)
    for bounds in (None, [0, 5, 12]):
        extra = {BOUNDS_KWARG: bounds} if bounds else {}
        mask = None if bounds else torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
        q, k, v = _qkv(12, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = varlen_attention(module, q, k, v, mask, **extra)
        assert out.dtype == torch.float32
        out.square().sum().backward()
        rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
        if bounds:  # the reference: each packed example on its own
            ref = torch.cat([sdpa_attention_forward(module, rq[:, :, s:e], rk[:, :, s:e], rv[:, :, s:e], None)[0]
                             for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
        else:
            ref = sdpa_attention_forward(module, rq, rk, rv, mask)[0]
        ref.square().sum().backward()
        assert torch.equal(out, ref)
        assert torch.equal(q.grad, rq.grad) and torch.equal(k.grad, rk.grad)
        assert torch.equal(v.grad, rv.grad.bfloat16())


def _losses(tmp_path, model, name: str, precision: str) -> list[float]:
    tree = config_tree(model, write_jsonl(tmp_path / f"{name}.jsonl", VARIED_ROWS), tmp_path / name,
                       train={"max_steps": 4, "batch_size": 4, "precision": precision})
    result = loop.train(validate_config(tree))
    return [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]


def test_bf16_training_on_the_cpu_follows_the_float32_run(tmp_path, stories260k):
    fp32 = _losses(tmp_path, stories260k, "fp32", "fp32")
    bf16 = _losses(tmp_path, stories260k, "bf16", "bf16")
    assert bf16 != fp32  # it really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.02 * a, (fp32, bf16)  # bf16 keeps 8 significant bits: about 0.4% a product
