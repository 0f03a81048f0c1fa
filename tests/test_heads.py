"""Losses and output conversions per task kind against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from medmeta.learners.heads import check_labels, make_head, task_loss, task_predictions, task_probabilities
from medmeta.tasks import TaskDescription, TaskTarget

MULTI = TaskDescription("MULTICLASS_CLASSIFICATION", ("a", "b", "c"), "d: t", "dom")
BIN = TaskDescription("BINARY_CLASSIFICATION", ("neg", "pos"), "d: b", "dom")
ML = TaskDescription("MULTILABEL_CLASSIFICATION", ("x", "y"), "d: m", "dom")


def test_cross_entropy_matches_hand_value() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert task_loss(logits, torch.tensor([0]), TaskTarget.MULTICLASS_CLASSIFICATION).item() == pytest.approx(expected)


def test_binary_loss_is_sigmoid_bce_on_one_column() -> None:
    logits = torch.tensor([[0.0], [math.log(3.0)]])
    labels = torch.tensor([[1.0], [1.0]])
    expected = (math.log(2.0) + -math.log(0.75)) / 2
    assert task_loss(logits, labels, "BINARY_CLASSIFICATION").item() == pytest.approx(expected, rel=1e-6)
    assert task_probabilities(logits, TaskTarget.BINARY_CLASSIFICATION)[1, 0].item() == pytest.approx(0.75)
    assert task_predictions(logits, TaskTarget.BINARY_CLASSIFICATION).tolist() == [[0.0], [1.0]]


def test_ordinal_soft_loss_prefers_near_misses() -> None:
    labels = torch.tensor([0])
    near = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    far = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    t = TaskTarget.ORDINAL_REGRESSION
    assert task_loss(near, labels, t, ordinal_loss="soft") < task_loss(far, labels, t, ordinal_loss="soft")
    assert task_loss(near, labels, t) == pytest.approx(task_loss(far, labels, t).item())


def test_heads_are_sized_from_the_task() -> None:
    assert make_head(8, BIN).out_features == 1
    assert make_head(8, MULTI).out_features == 3
    assert make_head(8, ML).out_features == 2


def test_check_labels_names_the_problem() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        check_labels(torch.tensor([0, 3]), MULTI)
    with pytest.raises(ValueError, match=r"shape \(N, 1\)"):
        check_labels(torch.tensor([0.0, 1.0]), BIN)
    with pytest.raises(ValueError, match="other than 0/1"):
        check_labels(torch.tensor([[0.0, 2.0]]), ML)
    check_labels(torch.tensor([[0.0, 1.0]]), ML)
