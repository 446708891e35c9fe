"""The learning-rate schedule, the decay groups, and run-length settings."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import TrainConfig, validate_config
from tunelab.train import loop
from tunelab.runfiles import read_metrics
from tunelab.train.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_reaches_the_floor():
    cfg = TrainConfig(max_steps=12, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 12, cfg) for s in range(12)]
    assert f[:2] == [1 / 3, 2 / 3]
    assert f[2] == 1.0 and f[-1] == pytest.approx(0.1)
    # step 5 is 3 of the 9 decay intervals in: 0.1 + 0.9 * (1 + cos(pi/3)) / 2
    assert f[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert all(a >= b for a, b in zip(f[2:], f[3:]))


def test_linear_and_constant():
    lin = TrainConfig(max_steps=5, schedule="linear")
    assert [lr_factor(s, 5, lin) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    const = TrainConfig(max_steps=5, schedule="constant", warmup_steps=1)
    assert [lr_factor(s, 5, const) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainConfig(max_steps=1, weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    cfg = TrainConfig(max_steps=10, learning_rate=0.5, schedule="linear")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, 10, cfg)
    assert sched.get_last_lr() == [0.5, 0.5]
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5 * 8 / 9] * 2)


def test_adamw_is_fused_on_the_cpu_and_updates_as_the_multi_tensor_path_does():
    """AdamW takes torch's fused kernel on the CPU by default (train.fused_adamw: false keeps the multi-tensor
    path): over 10 steps of a least-squares problem the weights stay within float32 rounding of that path's."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 32), torch.randn(64, 16)
    weights = {}
    for fused in (None, False):
        torch.manual_seed(1)
        layer = torch.nn.Linear(32, 16)
        opt = build_optimizer(layer, TrainConfig(max_steps=10, learning_rate=1e-2, weight_decay=0.1,
                                                 fused_adamw=fused), torch.device("cpu"))
        assert opt.defaults["fused"] is (True if fused is None else None)
        for _ in range(10):
            ((layer(inputs) - targets) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        weights[fused] = layer.weight.detach()
    torch.testing.assert_close(weights[None], weights[False], rtol=1e-5, atol=1e-6)


def test_sgd_is_plain_gradient_descent():
    """train.optimizer: sgd moves each weight by -lr * (gradient + weight_decay * weight), biases undecayed;
    it keeps no state, and plan counts none."""
    from typing import get_args

    from tunelab.plan.estimate import OPTIMIZER_STATES

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).square().sum().backward()
    opt = build_optimizer(model, TrainConfig(max_steps=1, optimizer="sgd", learning_rate=0.1, weight_decay=0.5),
                          torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD)
    opt.step()
    (w0, b0), (w, b) = before, list(model.parameters())
    torch.testing.assert_close(w, w0 - 0.1 * (w.grad + 0.5 * w0))
    torch.testing.assert_close(b, b0 - 0.1 * b.grad)
    assert not opt.state_dict()["state"]
    assert set(OPTIMIZER_STATES) == set(get_args(TrainConfig.model_fields["optimizer"].annotation))
    assert OPTIMIZER_STATES["sgd"] == 0


def test_epochs_set_the_number_of_steps(tmp_path, stories260k):
    train_file = write_jsonl(tmp_path / "t.jsonl", VARIED_ROWS)  # 24 examples
    tree = config_tree(stories260k, train_file, tmp_path / "run", train={"max_steps": None, "epochs": 1.5,
                                                                       "batch_size": 4, "grad_accum": 2})
    result = loop.train(validate_config(tree))
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert result.steps == 5 == len(rows)  # ceil(1.5 * 24 / 8)
    assert rows[-1]["epoch"] == pytest.approx(40 / 24, abs=1e-3)


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tmp_path, stories260k):
    losses = {}
    for precision in ("fp32", "bf16"):
        tree = config_tree(stories260k, write_jsonl(tmp_path / "t.jsonl", VARIED_ROWS), tmp_path / precision,
                           train={"max_steps": 2, "precision": precision})
        result = loop.train(validate_config(tree))
        losses[precision] = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert losses["bf16"] != losses["fp32"]  # it really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
