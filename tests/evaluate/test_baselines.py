"""Model-free baselines (majority label, chance, copy the prompt), and a comparison that never recommends a
strategy that does not beat them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_file
from tunelab.compare import CompareRow, measured_recommendation
from tunelab.data.records import Example
from tunelab.evaluate.baselines import baselines
from tunelab.evaluate.metrics import compute
from tunelab.plan.advisor import Situation, advise


def _label(text: str, label: str, row: int) -> Example:
    return Example("text_label", {"text": text, "label": label}, "x.tsv", row)


def test_majority_and_chance_on_real_sms_spam():
    """The case from the field: an SMS split that is mostly "ham", where always answering "ham" scores high."""
    lines = shared_file("sms_spam/SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines()
    rows = [_label(text, label, i) for i, (label, text) in enumerate(line.split("\t", 1) for line in lines)]
    train, evals = rows[:4000], rows[4000:4400]
    refs = [ex.target for ex in evals]
    got = baselines("score", ["accuracy", "macro_f1"], evals, train, ["ham", "spam"], refs)
    assert got["majority"]["answer"] == "ham"
    share = refs.count("ham") / len(refs)  # counted here, independently of tunelab's metrics
    assert got["majority"]["accuracy"] == pytest.approx(share) and share > 0.8
    assert got["majority"]["macro_f1"] == pytest.approx(share / (1 + share))  # F1(ham) = 2s/(1+s), F1(spam) = 0
    assert got["chance"]["accuracy"] == pytest.approx(0.5, abs=0.03)  # two labels uniformly at random


def test_majority_ties_break_in_sorted_order_and_fall_back_to_the_eval_labels():
    evals = [_label("a", lab, i) for i, lab in enumerate(["b", "a", "b", "a", "c"])]
    refs = [ex.target for ex in evals]
    got = baselines("score", ["accuracy"], evals, [], ["a", "b", "c"], refs)
    assert got["majority"]["answer"] == "a" and got["majority"]["accuracy"] == pytest.approx(0.4)
    assert "eval labels" in got["majority"]["source"]


def test_copy_the_prompt_scores_the_raw_prompt():
    evals = [Example("prompt_completion", {"prompt": p, "completion": c}, "x.jsonl", i)
             for i, (p, c) in enumerate([("the cat sat", "the cat"), ("a dog ran home", "dog home")])]
    refs = [ex.target for ex in evals]
    got = baselines("generate", ["rouge_l", "exact_match"], evals, [], [], refs)
    expected = compute(["rouge_l", "exact_match"], ["the cat sat", "a dog ran home"], refs)
    assert {k: got["copy the prompt"][k] for k in expected} == expected
    assert got["copy the prompt"]["rouge_l"] > 0.5


def _row(name, acc, ppl):
    return CompareRow(name, 1, 0.1, 1.0, None, None, None, None, 1e-3, metrics={"accuracy": acc}, perplexity_ratio=ppl)


FLOOR = {"majority": {"answer": "ham", "source": "s", "accuracy": 0.875}, "chance": {"answer": "c", "source": "s",
                                                                                     "accuracy": 0.5}}


def test_the_recommendation_must_beat_the_majority_label():
    # without the floor, lora (within 0.02 of the best, and forgetting least) would be picked at 0.870
    table = [_row("lora", 0.870, 1.0), _row("full", 0.880, 3.0)]
    assert measured_recommendation(table, "accuracy")[0] == "lora"
    pick, why = measured_recommendation(table, "accuracy", FLOOR)
    assert pick == "full" and "above majority's 0.875" in why
    pick, why = measured_recommendation([_row("lora", 0.850, 1.0), _row("full", 0.875, 3.0)], "accuracy", FLOOR)
    assert pick is None and "no strategy beats majority (accuracy 0.875, ham)" in why


def test_the_advisor_follows_a_measured_pick_and_falls_back_to_its_rules_when_none_beat_the_baseline(tmp_path):
    situation = Situation(num_examples=2000, target_tokens=10_000, task="classification", retention="medium",
                          fits={}, memory_gib={}, trainable_share={}, device_gib=24)
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"recommended": "full", "recommendation": "measured: full — accuracy 0.9"}))
    assert advise(situation, path).strategy == "full" and advise(situation, path).rule == "measured"
    path.write_text(json.dumps({"recommended": None, "recommendation": "measured: no strategy beats majority"}))
    advice = advise(situation, path)
    assert advice.rule != "measured" and advice.strategy == advise(situation).strategy
    assert "no strategy beats majority" in advice.reasons
