"""Metrics against values computed by hand."""

from __future__ import annotations

import pytest

from tunelab.evaluate import metrics as m


def test_exact_match_and_accuracy():
    assert m.normalize("The Cat, sat!") == "cat sat"
    assert m.exact_match(["The cat sat.", "a dog"], ["cat sat", "cat"]) == 0.5
    assert m.accuracy([" card_arrival", "lost_card"], ["card_arrival", "card_arrival"]) == 0.5


def test_macro_f1_by_hand():
    preds = ["a", "a", "b", "b", "c"]
    refs = ["a", "b", "b", "b", "a"]
    # a: tp1 fp1 fn1 -> 2/4 = 0.5; b: tp2 fp0 fn1 -> 4/5 = 0.8; (c is not a reference class)
    assert m.macro_f1(preds, refs) == pytest.approx((0.5 + 0.8) / 2)


def test_token_f1_by_hand():
    # "the cat sat on mat" vs "a cat on the mat": normalised [cat sat on mat] vs [cat on mat]: common 3, p 3/4, r 3/3
    assert m.token_f1(["the cat sat on mat"], ["a cat on the mat"]) == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert m.token_f1([""], [""]) == 1.0 and m.token_f1(["x"], ["y"]) == 0.0


def test_rouge_l_by_hand():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4, F = 0.75
    assert m.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)


def test_bleu_perfect_and_zero():
    assert m.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert m.bleu(["xyz"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_gsm8k_answer_extraction():
    assert m.extract_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert m.extract_number("so the total is $1,250.50 dollars") == "1250.5"
    assert m.extract_number("#### -3") == "-3"
    assert m.extract_number("no number here") is None
    assert m.numeric_match(["The answer is 72.", "I think 5"], ["...#### 72", "#### 6"]) == 0.5


def test_unknown_metric():
    with pytest.raises(Exception, match="unknown metric 'bluerg'"):
        m.compute(["bluerg"], ["a"], ["a"])
