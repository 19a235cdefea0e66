"""Metrics against hand-computed values."""
from __future__ import annotations

import pytest

from softprompt.task_metrics import accuracy, bleu, bootstrap_ci, exact_match, macro_f1, metric_fn, normalize, rouge_l, token_f1


def test_accuracy_and_exact_match():
    assert accuracy(["a", "b", "c", "a"], [["a"], ["a"], ["c"], ["b"]]) == 0.5
    assert normalize("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match(["the eiffel tower", "Paris."], [["Eiffel Tower"], ["London", "paris"]]) == 1.0
    assert exact_match(["x"], [["y"]]) == 0.0


def test_macro_f1_by_hand():
    preds = ["pos", "pos", "neg", "neg", "pos"]
    gold = [["pos"], ["neg"], ["neg"], ["neg"], ["pos"]]
    # pos: tp=2 fp=1 fn=0 -> f1 = 4/5; neg: tp=2 fp=0 fn=1 -> f1 = 4/5
    assert macro_f1(preds, gold) == pytest.approx(0.8)
    # a class never predicted has F1 0
    assert macro_f1(["a", "a"], [["a"], ["b"]]) == pytest.approx((2 / 3 + 0) / 2)


def test_token_f1_by_hand():
    # "the eiffel tower in paris" -> [eiffel, tower, in, paris]; ref [eiffel, tower]: P = 2/4, R = 1 -> F1 = 2/3
    assert token_f1(["the Eiffel Tower in Paris"], [["Eiffel Tower"]]) == pytest.approx(2 / 3)
    assert token_f1(["x", "paris"], [["y"], ["London", "Paris."]]) == pytest.approx(0.5)  # best reference, mean over examples
    assert token_f1(["a"], [["the"]]) == 1.0  # both empty after normalization
    assert metric_fn("f1") is token_f1


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat ate") = 2; P = R = 2/3 -> F = 2/3
    assert rouge_l(["the cat sat"], [["the cat ate"]]) == pytest.approx(2 / 3)
    assert rouge_l(["a b"], [["x y", "a b"]]) == pytest.approx(1.0)  # best reference


def test_bleu_identity_and_zero():
    assert bleu(["the quick brown fox jumps over"], [["the quick brown fox jumps over"]]) == pytest.approx(100.0)
    assert bleu(["aaa bbb ccc ddd"], [["www xxx yyy zzz"]]) == pytest.approx(0.0)


def test_bootstrap_interval_contains_point_and_is_deterministic():
    preds = ["a"] * 30 + ["b"] * 10
    refs = [["a"]] * 40
    lo, hi = bootstrap_ci("accuracy", preds, refs, resamples=300, seed=1)
    assert lo <= 0.75 <= hi and 0.5 < lo < hi < 1.0
    assert (lo, hi) == bootstrap_ci("accuracy", preds, refs, resamples=300, seed=1)
    assert bootstrap_ci("accuracy", ["a"] * 5, [["a"]] * 5) == (1.0, 1.0)
