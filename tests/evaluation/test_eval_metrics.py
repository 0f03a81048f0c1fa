"""Metrics and rank aggregation against hand-computed values and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medmeta.evaluation.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    binary_auroc,
    episode_metrics,
    mean_ci,
    ordinal_mae,
)
from medmeta.evaluation.ranking import rank_then_aggregate, task_ranks

MC = "MULTICLASS_CLASSIFICATION"


def test_hand_computed_multiclass_metrics():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])  # predictions 0, 0, 1, 1
    assert accuracy(logits, labels, MC) == pytest.approx(0.75)
    assert balanced_accuracy(logits, labels, MC) == pytest.approx((2 / 3 + 1) / 2)
    m = episode_metrics(logits, labels, MC)
    assert set(m) == {"accuracy", "balanced_accuracy", "auroc", "auroc_defined"}
    # class 2 has no positives: left out of the macro AUROC, counted in auroc_defined
    assert m["auroc_defined"] == 2


def test_hand_computed_binary_auroc_with_ties():
    assert binary_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert binary_auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    assert math.isnan(binary_auroc([0.1, 0.2], [1, 1]))
    logits = torch.tensor([[-1.0], [2.0], [0.5], [-0.2]])
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0]])  # predictions 0, 1, 1, 0
    assert accuracy(logits, labels, "BINARY_CLASSIFICATION") == pytest.approx(0.5)
    assert balanced_accuracy(logits, labels, "BINARY_CLASSIFICATION") == pytest.approx(0.5)
    assert auroc(logits, labels, "BINARY_CLASSIFICATION") == pytest.approx(0.75)


def test_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    # binary with ties
    scores = rng.integers(0, 5, 40).astype(float)
    y = rng.integers(0, 2, 40)
    assert binary_auroc(scores, y) == pytest.approx(roc_auc_score(y, scores))
    # multi-class: macro one-vs-rest on softmax probabilities
    logits = rng.standard_normal((60, 4))
    y = np.repeat(np.arange(4), 15)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auroc(logits, y, MC) == pytest.approx(expected)
    assert auroc(logits, y, "ORDINAL_REGRESSION") == pytest.approx(expected)
    assert balanced_accuracy(logits, y, MC) == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))
    # multi-label: mean over labels
    logits = rng.standard_normal((50, 3))
    y = (rng.random((50, 3)) < 0.4).astype(float)
    assert auroc(logits, y, "MULTILABEL_CLASSIFICATION") == pytest.approx(roc_auc_score(y, logits, average="macro"))
    # a label with one class present is left out, not scored as 0.5
    y[:, 2] = 1
    expected = np.mean([roc_auc_score(y[:, j], logits[:, j]) for j in range(2)])
    assert auroc(logits, y, "MULTILABEL_CLASSIFICATION") == pytest.approx(expected)
    assert episode_metrics(logits, y, "MULTILABEL_CLASSIFICATION")["auroc_defined"] == 2


def test_multilabel_accuracy_is_per_decision():
    logits = np.array([[1.0, -1.0], [1.0, 1.0]])
    labels = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, labels, "MULTILABEL_CLASSIFICATION") == pytest.approx(0.5)
    # label 0: TNR 0, TPR 1 -> 0.5; label 1: TPR 1/2 -> only positives present -> 0.5
    assert balanced_accuracy(logits, labels, "MULTILABEL_CLASSIFICATION") == pytest.approx(0.5)


def test_ordinal_mae_in_class_steps():
    logits = np.eye(4)[[0, 2, 1, 3]] * 5.0  # predictions 0, 2, 1, 3
    labels = np.array([0, 0, 2, 3])
    assert ordinal_mae(logits, labels) == pytest.approx(0.75)
    assert episode_metrics(logits, labels, "ORDINAL_REGRESSION")["mae"] == pytest.approx(0.75)
    assert "mae" not in episode_metrics(logits, labels, MC)


def test_mean_ci_hand_computed():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert ci.mean == pytest.approx(2.5)
    assert ci.half_width == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert ci.n == 4 and ci.low == pytest.approx(2.5 - ci.half_width)
    nan_ignored = mean_ci([1.0, float("nan"), 3.0])
    assert nan_ignored.n == 2 and nan_ignored.mean == pytest.approx(2.0)
    assert math.isnan(mean_ci([0.7]).half_width) and mean_ci([]).n == 0
    assert ci.format(scale=100) == "250.00 ± 126.52"


def test_bad_metric_input():
    with pytest.raises(ValueError, match="labels outside"):
        accuracy(np.zeros((2, 2)), np.array([0, 2]), MC)
    with pytest.raises(ValueError, match="do not match"):
        auroc(np.zeros((3, 1)), np.zeros((3, 2)), "BINARY_CLASSIFICATION")
    with pytest.raises(ValueError, match="unknown"):
        episode_metrics(np.zeros((2, 2)), np.array([0, 1]), MC, metrics=["f1"])


def _table(rows):
    return pd.DataFrame(rows, columns=["method", "dataset", "task", "accuracy"])


def test_rank_then_aggregate_with_ties():
    scores = {"T1": {"A": 0.9, "B": 0.9, "C": 0.5}, "T2": {"A": 0.6, "B": 0.7, "C": 0.8}, "T3": {"A": 0.8, "B": 0.4, "C": 0.4}}
    df = _table([(m, "d", t, s) for t, row in scores.items() for m, s in row.items()])
    out = rank_then_aggregate(df, "accuracy")
    assert out["method"].tolist() == ["A", "B", "C"]
    np.testing.assert_allclose(out["mean_rank"], [(1.5 + 3 + 1) / 3, (1.5 + 2 + 2.5) / 3, (3 + 1 + 2.5) / 3])
    assert out["tasks"].tolist() == [3, 3, 3]
    ranks = task_ranks(df, "accuracy").set_index(["task", "method"])["rank"]
    assert ranks[("T1", "A")] == 1.5 and ranks[("T3", "C")] == 2.5
    lower = rank_then_aggregate(df, "accuracy", higher_is_better=False)
    assert lower["method"].tolist() == ["C", "B", "A"]


def test_rank_then_aggregate_averages_over_shots_first():
    df = pd.DataFrame(
        [
            ("A", "d", "T", 3, 1.0), ("A", "d", "T", 3, 1.0), ("A", "d", "T", 4, 0.8),  # mean over shots 0.9
            ("B", "d", "T", 3, 0.92), ("B", "d", "T", 4, 0.92),  # 0.92: better than A's 0.9 (A's row mean is 0.933)
        ],
        columns=["method", "dataset", "task", "shots", "accuracy"],
    )
    out = rank_then_aggregate(df)
    assert out["method"].tolist() == ["B", "A"]
    assert out.set_index("method").loc["A", "mean_score"] == pytest.approx(0.9)


def test_rank_then_aggregate_missing_method_is_an_error():
    df = _table([("A", "d", "T1", 0.5), ("B", "d", "T1", 0.6), ("A", "d", "T2", 0.5)])
    with pytest.raises(ValueError, match=r"\['B'\] have no result on task"):
        rank_then_aggregate(df)
