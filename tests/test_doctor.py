"""`tunelab doctor` on runs engineered to show each pathology, and on a healthy run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import config_tree, write_jsonl
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.doctor import diagnose
from tunelab.errors import NonFiniteError
from tunelab.train.loop import train

COLOURS = [{"text": f"Tom saw a {c} {a}.", "label": c} for c in ("red", "blue", "green") for a in
           ("ball", "car", "dog", "cat", "box", "hat", "cup", "bird")]
TEMPLATE = {"prompt": "{text}\nColour:", "target": " {label}"}


def _run(tmp_path, stories260k, name, rows=COLOURS, **train_settings):
    tree = config_tree(stories260k, write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / name,
                       data={"eval_fraction": 0.25}, strategy={"name": "full", "template": TEMPLATE},
                       train={"batch_size": 6, "eval_every": 5, **train_settings})
    return train(validate_config(tree)).run_dir


def _whats(result):
    return [f["what"] for f in result["findings"]]


def test_learning_rate_of_10_diverges(tmp_path, stories260k):
    # the loss explodes; whether it reaches NaN (the run then stops at that step: train.on_nonfinite: stop) or stays
    # a finite thousand-fold of its start depends on the CPU's float arithmetic: the diagnosis is the same
    try:
        _run(tmp_path, stories260k, "lr10", max_steps=20, learning_rate=10.0)
    except NonFiniteError:
        pass
    result = diagnose(tmp_path / "lr10")
    assert any("diverged" in w or "too high" in w for w in _whats(result)), _whats(result)
    assert not result["healthy"]


def test_learning_rate_of_1e_9_stays_flat(tmp_path, stories260k):
    result = diagnose(_run(tmp_path, stories260k, "lr1e-9", max_steps=25, learning_rate=1e-9))
    assert _whats(result) == ["learning rate too low: the loss stayed flat"]


def test_tiny_train_set_overfits(tmp_path, stories260k):
    # labels that the input does not predict: the only way down for the train loss is memorising
    words = ["apple", "river", "lamp", "stone", "cloud", "paper", "garden", "window", "candle", "bridge", "forest",
             "mirror", "button", "basket", "ladder", "pepper"]
    rows = [{"text": f"Story number {i} is about a small {a}.", "label": words[i]}
            for i, a in enumerate(["dog", "cat", "bird", "fish", "frog", "duck", "bear", "fox", "owl", "cow", "pig",
                                   "hen", "bee", "ant", "rat", "elk"])]
    run_dir = _run(tmp_path, stories260k, "overfit", rows=rows, max_steps=120, learning_rate=1e-2, batch_size=12,
                   save_every=10, keep_checkpoints=20, schedule="constant")
    result = diagnose(run_dir)
    over = [f for f in result["findings"] if f["what"].startswith("overfitting")]
    assert over, _whats(result)
    assert "checkpoints/step-" in over[0]["fix"]


def test_healthy_run_gets_a_clean_bill(tmp_path, stories260k, capsys):
    run_dir = _run(tmp_path, stories260k, "healthy", max_steps=40, learning_rate=3e-3, warmup_steps=3)
    result = diagnose(run_dir)
    assert result["healthy"], _whats(result)
    assert main(["doctor", str(run_dir), "--output", str(tmp_path / "doctor.json")]) == 0
    assert "clean bill of health" in capsys.readouterr().out
    assert json.loads((tmp_path / "doctor.json").read_text())["healthy"] is True


def test_never_emits_eos_and_forgetting_from_diff(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0, "grad_norm": 1.0,
                                                        "num_tokens": 100, "num_label_tokens": 40}) + "\n")
    (tmp_path / "diff.json").write_text(json.dumps(_diff("strong forgetting (1.6x)", "large shift (0.9)",
                                                         "collapsed into the task format: 0% -> 80%")))
    whats = _whats(diagnose(tmp_path))
    assert whats == ["the tuned model never emits EOS", "format collapse", "forgetting above the threshold"]


def _diff(ppl_text: str, kl_text: str, collapse_text: str, levels: tuple[str, str, str] = ("bad", "bad", "bad")):
    """A diff.json as tunelab diff writes it: each verdict {figure, value, threshold, level, text}."""
    def verdict(figure, value, level, text):
        return {"figure": figure, "value": value, "threshold": [1.05, 1.25], "level": level, "text": text}

    return {"forgetting": {"perplexity_verdict": verdict("general-text perplexity", 1.6, levels[0], ppl_text),
                           "kl_verdict": verdict("KL(base||tuned)", 0.9, levels[1], kl_text), "perplexity_ratio": 1.6},
            "drift": {"eos_share_tuned": 0.0, "collapse_verdict": verdict("task-format share", 0.8, levels[2],
                                                                          collapse_text)}}


def test_diagnoses_read_the_verdicts_level_not_their_wording(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0, "grad_norm": 1.0,
                                                        "num_tokens": 100, "num_label_tokens": 40}) + "\n")
    (tmp_path / "diff.json").write_text(json.dumps(_diff("reworded: much higher", "reworded", "reworded")))
    assert _whats(diagnose(tmp_path))[1:] == ["format collapse", "forgetting above the threshold"]
    (tmp_path / "diff.json").write_text(json.dumps(_diff("strong forgetting", "large shift", "collapsed",
                                                         ("warning", "ok", "ok"))))
    assert _whats(diagnose(tmp_path)) == ["the tuned model never emits EOS"]


def test_exit_code_is_1_for_an_error_finding_and_0_for_warnings(tmp_path, capsys):
    def run_dir(name, losses, data_row=None):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"type": "data", "step": 0, **data_row}] if data_row else []
        rows += [{"type": "train", "step": i + 1, "loss": loss, "grad_norm": 1.0, "num_tokens": 100,
                  "num_label_tokens": 40} for i, loss in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    diverged = run_dir("nan", [2.0, 1.5, "NaN"])
    assert main(["doctor", str(diverged)]) == 1
    assert "[error] training diverged" in capsys.readouterr().out
    truncated = run_dir("cut", [2.0, 1.5, 1.2], {"targets_truncated": 3, "num_examples": 10})
    assert main(["doctor", str(truncated)]) == 0  # a warning: the run's result is usable
    assert "[warning] targets truncated" in capsys.readouterr().out
    assert main(["doctor", str(tmp_path / "missing")]) == 2


def test_not_a_run_directory(tmp_path):
    with pytest.raises(Exception, match="no metrics.jsonl"):
        diagnose(tmp_path)


def test_a_detachable_adaptation_that_keeps_the_base_is_not_called_forgetting(tmp_path):
    """A soft prompt or adapter whose general-text shift vanishes with it off: the doctor says to serve general
    requests without it, not to tune fewer parameters; where the base did change, the measured alternatives are
    ranked with their adaptation off."""
    (tmp_path / "run").mkdir()
    run = tmp_path / "run"
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0, "grad_norm": 1.0,
                                                   "num_tokens": 100, "num_label_tokens": 40}) + "\n")
    d = _diff("strong forgetting (87x)", "large shift (3.1)", "no format collapse", ("bad", "bad", "ok"))
    d["forgetting"]["adaptation_off"] = {"perplexity_ratio": 1.0, "verdict": {
        "figure": "general-text perplexity with the adaptation off", "value": 1.0, "threshold": [1.05, 1.25],
        "level": "ok", "text": "no measurable forgetting: general-text perplexity with the adaptation off x1"}}
    (run / "diff.json").write_text(json.dumps(d))
    found = {f["what"]: f for f in diagnose(run)["findings"]}
    assert "forgetting above the threshold" not in found
    shift = found["general text shifts with the adaptation on"]
    assert "with it off: no measurable forgetting" in shift["evidence"] and "adaptation off" in shift["fix"]
    del d["forgetting"]["adaptation_off"]  # full tuning: forgetting, with what forgot less measured beside it
    (run / "diff.json").write_text(json.dumps(d))
    (tmp_path / "compare.json").write_text(json.dumps({"table": [
        {"strategy": "lora", "perplexity_ratio": 1.9, "perplexity_ratio_off": 1.0},
        {"strategy": "freeze", "perplexity_ratio": 1.03, "perplexity_ratio_off": None}]}))
    fix = {f["what"]: f for f in diagnose(run)["findings"]}["forgetting above the threshold"]["fix"]
    assert "these forgot less: lora (x1.00 with the adaptation off), freeze (x1.03)" in fix
