"""Episode metrics per task kind, and means with 95% confidence intervals.

Inputs follow the label encoding of :mod:`medmeta.tasks`: logits ``(N, C)`` (``(N, 1)`` for
binary tasks) and labels as class positions ``(N,)`` or 0/1 ``(N, 1)`` / ``(N, K)``.

* accuracy: argmax (softmax tasks) or ``logit > 0`` (sigmoid tasks); for multi-label tasks the
  mean over every (image, label) decision.
* balanced accuracy: mean recall over the classes present in the labels (multi-class, ordinal);
  ``(TPR + TNR) / 2`` for binary; the mean of that over labels for multi-label (a label with one
  class present contributes the recall of that class, as scikit-learn does).
* AUROC: binary from the logit (Mann-Whitney with tied scores counted half); multi-class and
  ordinal: macro mean of one-vs-rest AUROCs on softmax probabilities (scikit-learn's
  ``multi_class="ovr"``); multi-label: mean of per-label AUROCs. A class or label whose labels
  hold only one value has no AUROC: it is left out of the mean, and the result is NaN when no
  class has one (``auroc_defined`` in :func:`episode_metrics` counts the classes used).
* ordinal MAE: mean absolute difference, in class steps, between the predicted (argmax) and the
  true class position (positions follow key order, see :mod:`medmeta.episodes.labels`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from medmeta.tasks import TaskTarget

__all__ = [
    "METRICS",
    "MeanCI",
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "binary_auroc",
    "ordinal_mae",
    "mean_ci",
    "episode_metrics",
    "metrics_for",
]

METRICS = ("accuracy", "balanced_accuracy", "auroc", "mae")


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _prepare(logits: Any, labels: Any, target: "str | TaskTarget") -> tuple[np.ndarray, np.ndarray, TaskTarget]:
    target = TaskTarget.parse(target)
    logits, labels = _np(logits), _np(labels)
    if logits.ndim == 1:
        logits = logits[:, None]
    if target.uses_sigmoid:
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.shape != logits.shape:
            raise ValueError(f"metrics: {target.value} labels {labels.shape} do not match logits {logits.shape}")
    else:
        if labels.ndim != 1 or len(labels) != len(logits):
            raise ValueError(f"metrics: {target.value} expects labels (N,) for logits (N, C), got {labels.shape} / {logits.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(f"metrics: labels outside 0..{logits.shape[1] - 1}")
    return logits, labels, target


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: Any, labels: Any, target: "str | TaskTarget") -> float:
    logits, labels, target = _prepare(logits, labels, target)
    if target.uses_sigmoid:
        return float(np.mean((logits > 0) == (labels == 1)))
    return float(np.mean(logits.argmax(axis=1) == labels))


def _binary_balanced(pred: np.ndarray, truth: np.ndarray) -> float:
    recalls = [np.mean(pred[truth == v] == v) for v in (0, 1) if np.any(truth == v)]
    return float(np.mean(recalls))


def balanced_accuracy(logits: Any, labels: Any, target: "str | TaskTarget") -> float:
    logits, labels, target = _prepare(logits, labels, target)
    if target.uses_sigmoid:
        pred = (logits > 0).astype(np.int64)
        truth = (labels == 1).astype(np.int64)
        return float(np.mean([_binary_balanced(pred[:, j], truth[:, j]) for j in range(truth.shape[1])]))
    pred = logits.argmax(axis=1)
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def binary_auroc(scores: Any, labels: Any) -> float:
    """AUROC of scores for 0/1 labels (ties count half); NaN when one class is missing."""
    scores, labels = _np(scores).reshape(-1), _np(labels).reshape(-1)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_parts(logits: np.ndarray, labels: np.ndarray, target: TaskTarget) -> list[float]:
    if target.uses_sigmoid:
        return [binary_auroc(logits[:, j], labels[:, j]) for j in range(labels.shape[1])]
    probs = _softmax(logits)
    return [binary_auroc(probs[:, c], labels == c) for c in range(logits.shape[1])]


def auroc(logits: Any, labels: Any, target: "str | TaskTarget") -> float:
    logits, labels, target = _prepare(logits, labels, target)
    parts = [p for p in _auroc_parts(logits, labels, target) if not math.isnan(p)]
    return float(np.mean(parts)) if parts else float("nan")


def ordinal_mae(logits: Any, labels: Any) -> float:
    """Mean absolute error in class steps between argmax and true class positions."""
    logits, labels, _ = _prepare(logits, labels, TaskTarget.ORDINAL_REGRESSION)
    return float(np.mean(np.abs(logits.argmax(axis=1) - labels)))


class MeanCI(NamedTuple):
    """Mean, half-width of the 95% confidence interval (1.96 x standard error) and count."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.half_width):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def mean_ci(values: Iterable[float], z: float = 1.96) -> MeanCI:
    """Mean and ``z`` x standard error (sample std with ddof=1 over sqrt(n)) of finite values.

    NaN values (undefined metrics) are left out and not counted; with one value the half-width
    is NaN, with none the mean is NaN too.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return MeanCI(float("nan"), float("nan"), 0)
    if n == 1:
        return MeanCI(float(arr[0]), float("nan"), 1)
    return MeanCI(float(arr.mean()), float(z * arr.std(ddof=1) / math.sqrt(n)), n)


def metrics_for(target: "str | TaskTarget", requested: Optional[Sequence[str]] = None) -> list[str]:
    """The metric names that apply to a task kind (``mae`` is ordinal only)."""
    target = TaskTarget.parse(target)
    names = list(METRICS if requested is None else requested)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; expected names from {METRICS}")
    return [m for m in names if m != "mae" or target is TaskTarget.ORDINAL_REGRESSION]


def episode_metrics(
    logits: Any, labels: Any, target: "str | TaskTarget", metrics: Optional[Sequence[str]] = None
) -> dict[str, float]:
    """The requested metrics (default: every one that applies) of one episode's query set."""
    logits, labels, target = _prepare(logits, labels, target)
    out: dict[str, float] = {}
    for name in metrics_for(target, metrics):
        if name == "accuracy":
            out[name] = accuracy(logits, labels, target)
        elif name == "balanced_accuracy":
            out[name] = balanced_accuracy(logits, labels, target)
        elif name == "auroc":
            parts = [p for p in _auroc_parts(logits, labels, target) if not math.isnan(p)]
            out["auroc"] = float(np.mean(parts)) if parts else float("nan")
            out["auroc_defined"] = float(len(parts))
        elif name == "mae":
            out["mae"] = ordinal_mae(logits, labels)
    return out
