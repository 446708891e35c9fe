"""`tunelab plan --measure`'s step timer times the recipe's own steps (`loop.take_step`) on sessions set up as
the recipe sets them up (`train/session.py`), with copies of the model cut to a few decoder layers."""

from __future__ import annotations

import math
from collections import Counter

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.config import validate_config
from tunelab.plan.run import MEASURED, plan
from tunelab.train import loop, timing


def test_the_timer_times_the_recipes_own_step_on_cut_copies(tmp_path, stories260k, monkeypatch):
    cfg = validate_config(config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                                      strategy={"name": "lora"}))
    sessions, figures = [], []
    real_step = loop.take_step

    def recorded_step(session):
        sessions.append(session)
        figures.append(real_step(session))
        return figures[-1]

    monkeypatch.setattr(loop, "take_step", recorded_step)
    estimate = plan(cfg, "cpu", strategies=["lora"], step_timer=timing.measured_step_seconds).estimates["lora"]
    assert estimate.time_source == MEASURED and 0 < estimate.step_seconds < math.inf
    by_session = Counter(id(s) for s in sessions)
    copies = {id(s): s.train_model.base.config.num_hidden_layers for s in sessions}
    assert sorted(copies.values()) == [1, 3]  # stories260K has 5 layers: copies of 3 and 1 give the cost of one
    assert all(n >= timing.WARMUP_STEPS + timing.MIN_STEPS for n in by_session.values())
    for s in {id(s): s for s in sessions}.values():  # the recipe's set-up: LoRA trains, its optimizer holds just that
        trained = [name for name, p in s.train_model.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in name for name in trained)
        assert [p for group in s.optimizer.param_groups for p in group["params"]] == s.trainable
        assert len(s.trainable) == len(trained)
    assert all(f.finite and f.num_label_tokens > 0 for f in figures)  # real steps, every update applied
