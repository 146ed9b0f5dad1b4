"""Multi-label and imbalance metrics (metrics.py): AP, F1 at thresholds, threshold calibration, balanced accuracy."""
import random

import numpy as np
import pytest
import torch

from raytimm.metrics import (
    DEFAULT_THRESHOLD,
    MULTI_LABEL_KEYS,
    RANKING_METRICS,
    SINGLE_LABEL_KEYS,
    ClassificationSums,
    MultiLabelScores,
    average_precision,
    balanced_accuracy,
    calibrate_thresholds,
    f1_optimal_threshold,
    multilabel_metrics,
)


def test_average_precision_by_hand():
    # ranked: + - + -  -> precision at the positives 1/1 and 2/3: AP = (1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.9, 0.8, 0.7], [1, 1, 0]) == pytest.approx(1.0)
    assert average_precision([0.9, 0.8, 0.7], [0, 0, 1]) == pytest.approx(1 / 3)
    assert average_precision([0.3, 0.2], [0, 0]) is None  # no positives: undefined, left out of mAP


def test_average_precision_treats_tied_scores_as_one_threshold_whatever_the_order():
    # A tie of a positive and a negative at the top: one threshold with precision 1/2, then the last positive.
    scores, targets = [0.5, 0.5, 0.2], [1, 0, 1]
    expected = 0.5 * 0.5 + 0.5 * (2 / 3)
    assert average_precision(scores, targets) == pytest.approx(expected)
    assert average_precision([0.5, 0.5, 0.2], [0, 1, 1]) == pytest.approx(expected)
    rng = random.Random(0)
    s = [round(rng.random(), 1) for _ in range(200)]  # many ties
    t = [int(rng.random() < 0.3) for _ in range(200)]
    order = list(range(200))
    rng.shuffle(order)
    assert average_precision([s[i] for i in order], [t[i] for i in order]) == average_precision(s, t)


def test_average_precision_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(5):
        t = rng.random(300) < 0.2
        s = np.round(rng.random(300) * 0.5 + 0.4 * t, 2)  # informative, with ties
        assert average_precision(s, t) == pytest.approx(sklearn_metrics.average_precision_score(t, s), abs=1e-12)


def test_f1_optimal_threshold_on_a_constructed_example():
    # positives 0.9 0.8 0.3; negatives 0.7 0.2 0.1. Cuts (predict >= cut): 0.9 -> F1 .5, 0.8 -> .8,
    # 0.7 -> .667, 0.3 -> .857 (best), 0.2 -> .75, 0.1 -> .667. The threshold sits between 0.3 and 0.2.
    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    targets = [1, 1, 1, 0, 0, 0]
    t = f1_optimal_threshold(scores, targets)
    assert t == pytest.approx(0.25)
    m = multilabel_metrics(np.array(scores)[:, None], np.array(targets, bool)[:, None], [t], ["a"])
    assert m["per_class"][0]["f1"] == pytest.approx(100 * 6 / 7)
    assert m["per_class"][0]["precision"] == pytest.approx(75.0) and m["per_class"][0]["recall"] == 100.0
    # No other threshold does better on this set.
    for other in np.linspace(0.01, 0.99, 99):
        assert multilabel_metrics(np.array(scores)[:, None], np.array(targets, bool)[:, None], [other],
                                  ["a"])["per_class"][0]["f1"] <= m["per_class"][0]["f1"] + 1e-9


def test_f1_threshold_ties_go_to_the_higher_threshold_and_labels_without_positives_keep_the_default():
    # cut at 0.9 (tp1 fp0: F1 2/3) ties with cut at 0.1 (tp2 fp2: F1 4/6): the higher cut wins.
    assert f1_optimal_threshold([0.9, 0.6, 0.5, 0.1], [1, 0, 0, 1]) == pytest.approx(0.75)
    assert f1_optimal_threshold([0.9, 0.1], [0, 0]) == DEFAULT_THRESHOLD
    # Every sample positive: the lowest cut, half-way to zero.
    assert f1_optimal_threshold([0.4, 0.2], [1, 1]) == pytest.approx(0.1)
    scores = np.array([[0.9, 0.2], [0.1, 0.3]])
    assert calibrate_thresholds(scores, np.array([[1, 0], [0, 0]], bool)) == pytest.approx([0.5, 0.5])


def test_multilabel_metrics_micro_macro_and_rows():
    scores = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.2], [0.8, 0.4, 0.3], [0.1, 0.9, 0.6]])
    targets = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    m = multilabel_metrics(scores, targets, [0.5, 0.5, 0.5], ["a", "b", "c"])
    # a: tp2 fp0 fn0; b: tp2 fp1 fn0; c: tp0 fp1 fn0 (no positives: out of mAP and macro F1)
    assert m["f1_micro"] == pytest.approx(100 * 8 / (8 + 2))
    assert m["f1_macro"] == pytest.approx(100 * (1.0 + 0.8) / 2)
    assert m["mAP"] == pytest.approx(100 * (1.0 + average_precision(scores[:, 1], targets[:, 1])) / 2)
    rows = {r["class"]: r for r in m["per_class"]}
    assert [rows[c]["support"] for c in "abc"] == [2, 2, 0]
    assert rows["b"]["precision"] == pytest.approx(200 / 3) and rows["b"]["recall"] == 100.0
    assert rows["c"]["ap"] == 0.0 and rows["c"]["precision"] == 0.0 and rows["c"]["threshold"] == 0.5
    assert m["thresholds"] == [0.5, 0.5, 0.5]


def test_multilabel_scores_in_one_process():
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.5], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    acc = MultiLabelScores(2, torch.device("cpu"))
    acc.add(logits[:2], targets[:2])
    acc.add(logits[2:], targets[2:])
    r = acc.result(["x", "y"])
    assert r["num_samples"] == 3 and r["thresholds"] == [0.5, 0.5]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item()
    assert r["loss"] == pytest.approx(bce)
    assert r["mAP"] == pytest.approx(100.0) and r["f1_micro"] == pytest.approx(100 * 6 / 7)  # y: one false positive
    calibrated = acc.result(["x", "y"], calibrate=True)  # y's cut moves above its negative's score sigmoid(0.5)
    assert calibrated["f1_micro"] == pytest.approx(100.0)
    assert calibrated["thresholds"][1] == pytest.approx((torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(0.5))).item() / 2)


def test_balanced_accuracy_is_mean_recall_over_classes_with_samples():
    cm = [[8, 2, 0], [1, 1, 0], [0, 0, 0]]  # class 2 has no samples
    assert balanced_accuracy(cm) == pytest.approx(100 * (0.8 + 0.5) / 2)
    assert balanced_accuracy([[0, 0], [0, 0]]) == 0.0
    sums = ClassificationSums(2, torch.device("cpu"))
    sums.add(torch.tensor([[1.0, 0.0]] * 9 + [[0.0, 1.0]]), torch.tensor([0] * 9 + [1]))
    sums.add(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    r = sums.result()
    assert r["top1"] == pytest.approx(100 * 10 / 11) and r["balanced_acc"] == pytest.approx(75.0)


def test_metric_lists_per_task():
    assert "val/balanced_acc" in SINGLE_LABEL_KEYS and "val/mAP" not in SINGLE_LABEL_KEYS
    assert {"val/mAP", "val/f1_micro", "val/f1_macro", "val/loss"} <= set(MULTI_LABEL_KEYS)
    assert {"val/mAP", "val/f1_micro", "val/f1_macro", "val/balanced_acc"} <= set(RANKING_METRICS)
