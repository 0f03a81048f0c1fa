"""Heads, losses and output conversions per task kind.

One place decides how logits relate to labels for every task target (see :mod:`medmeta.tasks`
for the label encoding), so learners, protocols and metrics cannot disagree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import DataFormatError
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = [
    "make_head",
    "task_loss",
    "task_probabilities",
    "task_predictions",
    "ordinal_soft_targets",
    "check_labels",
]


def make_head(in_features: int, description: TaskDescription, bias: bool = True) -> nn.Linear:
    """A fresh linear head sized for the task: one output for binary, else one per class."""
    return nn.Linear(in_features, description.num_outputs, bias=bias)


def check_labels(labels: Tensor, description: TaskDescription, where: str = "labels") -> None:
    """Raise a clear error when ``labels`` do not follow the episode label encoding."""
    target = description.task_target
    n = description.num_classes
    if target.uses_sigmoid:
        k = description.num_outputs
        if labels.ndim != 2 or labels.shape[1] != k:
            raise DataFormatError(
                f"{where}: {description.task_identifier} ({target.value}) expects labels of shape "
                f"(N, {k}) with 0/1 values, got {tuple(labels.shape)}"
            )
        bad = ~((labels == 0) | (labels == 1))
        if bool(bad.any()):
            raise DataFormatError(f"{where}: {description.task_identifier} has labels other than 0/1")
    elif target in (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION):
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise DataFormatError(
                f"{where}: {description.task_identifier} ({target.value}) expects integer labels "
                f"of shape (N,), got {tuple(labels.shape)} {labels.dtype}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise DataFormatError(
                f"{where}: {description.task_identifier} has labels outside 0..{n - 1} "
                f"(min {int(labels.min())}, max {int(labels.max())}); classes are {list(description.classes)}"
            )
    else:
        raise DataFormatError(f"{where}: {target.value} is not a classification target")


def ordinal_soft_targets(labels: Tensor, num_classes: int, sigma: float = 1.0) -> Tensor:
    """Gaussian soft targets over ordered classes: near classes get more mass than far ones."""
    grid = torch.arange(num_classes, device=labels.device, dtype=torch.float32)
    dist = (grid[None, :] - labels[:, None].float()) ** 2
    weights = torch.exp(-dist / (2 * sigma**2))
    return weights / weights.sum(dim=1, keepdim=True)


def task_loss(
    logits: Tensor,
    labels: Tensor,
    target: TaskTarget,
    ordinal_loss: str = "ce",
    ordinal_sigma: float = 1.0,
) -> Tensor:
    """The training loss for a task kind.

    Softmax cross-entropy for multi-class and ordinal tasks (``ordinal_loss="soft"`` uses
    Gaussian soft targets so that near misses cost less), binary cross-entropy on sigmoid
    outputs for binary and multi-label tasks.
    """
    target = TaskTarget.parse(target)
    if target.uses_sigmoid:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    if target is TaskTarget.ORDINAL_REGRESSION and ordinal_loss == "soft":
        soft = ordinal_soft_targets(labels, logits.shape[1], ordinal_sigma).to(logits.dtype)
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    if target in (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION):
        if ordinal_loss not in ("ce", "soft"):
            raise ValueError(f"ordinal_loss: expected 'ce' or 'soft', got {ordinal_loss!r}")
        return F.cross_entropy(logits, labels.long())
    raise ValueError(f"task_loss: {target.value} is not a classification target")


def task_probabilities(logits: Tensor, target: TaskTarget) -> Tensor:
    """Probabilities from logits: softmax rows, or independent sigmoids (binary: shape (N, 1))."""
    target = TaskTarget.parse(target)
    return torch.sigmoid(logits) if target.uses_sigmoid else torch.softmax(logits, dim=1)


def task_predictions(logits: Tensor, target: TaskTarget, threshold: float = 0.0) -> Tensor:
    """Hard predictions in the label encoding: class positions, or 0/1 per sigmoid output."""
    target = TaskTarget.parse(target)
    if target.uses_sigmoid:
        return (logits > threshold).to(torch.float32)
    return logits.argmax(dim=1)
