"""Raw stored labels -> per-class item pools and episode label encodings.

One place decides which items count as positives and negatives of a class and how raw label
keys become episode labels (see :mod:`medmeta.tasks` for the encoding), so samplers, frozen
episode lists and the challenge interface cannot disagree.

* Multi-class / ordinal: class ``c`` (raw key ``label_keys[c]``) owns the items whose stored key
  equals it; episode labels are positions ``0..n_way-1`` of the kept classes (kept classes are
  always in description order, and ordinal keys are sorted, so gaps such as 1, 4, 6 map in order).
* Binary: the positive class is the second class of the description (``label_keys[1]``, the
  ``1`` of MedIMeta's ``{0: ..., 1: ...}`` files); episode labels are ``(N, 1)`` floats.
* Multi-label: column ``label_keys[c]`` of the ``(N, K)`` 0/1 label array is label ``c``; the
  episode keeps a subset of the columns, as ``(N, k)`` floats.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from medmeta.tasks import TaskDescription, TaskTarget

__all__ = [
    "SUPPORTED_TARGETS",
    "check_supported",
    "class_pools",
    "encode_labels",
    "labels_to_tensor",
    "ordered_class_positions",
    "positive_key",
]

SUPPORTED_TARGETS = (
    TaskTarget.MULTICLASS_CLASSIFICATION,
    TaskTarget.ORDINAL_REGRESSION,
    TaskTarget.BINARY_CLASSIFICATION,
    TaskTarget.MULTILABEL_CLASSIFICATION,
)


def check_supported(description: TaskDescription) -> None:
    """Raise a clear error for task targets that few-shot classification episodes cannot cover."""
    target = description.task_target
    if target not in SUPPORTED_TARGETS:
        valid = ", ".join(t.value for t in SUPPORTED_TARGETS)
        raise ValueError(
            f"{description.task_identifier}: few-shot episodes need a classification target "
            f"({valid}), got {target.value}"
        )
    if target is TaskTarget.BINARY_CLASSIFICATION and description.num_classes != 2:
        raise ValueError(
            f"{description.task_identifier}: a binary task needs exactly 2 classes, "
            f"got {list(description.classes)}"
        )


def positive_key(description: TaskDescription) -> int:
    """The raw key of the positive class of a binary task (the second class)."""
    return int(description.label_keys[1])


def _flat_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return labels


def class_pools(labels: np.ndarray, description: TaskDescription) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Item positions of the positives and negatives of every class of the task.

    Returns ``(positives, negatives)``, one sorted ``int64`` array per class in description
    order. Binary tasks have one "class" (the positive output); multi-class and ordinal tasks
    have empty negatives (their classes are exclusive).
    """
    check_supported(description)
    target = description.task_target
    labels = np.asarray(labels)
    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        if labels.ndim != 2:
            raise ValueError(
                f"{description.task_identifier}: multi-label labels must be (N, K), got {labels.shape}"
            )
        pos = [np.flatnonzero(labels[:, k] == 1).astype(np.int64) for k in description.label_keys]
        neg = [np.flatnonzero(labels[:, k] == 0).astype(np.int64) for k in description.label_keys]
        return pos, neg
    if target is TaskTarget.BINARY_CLASSIFICATION:
        flat = _flat_binary(labels)
        key = positive_key(description)
        return [np.flatnonzero(flat == key).astype(np.int64)], [np.flatnonzero(flat != key).astype(np.int64)]
    if labels.ndim != 1:
        raise ValueError(
            f"{description.task_identifier}: {target.value} labels must be (N,) keys, got {labels.shape}"
        )
    pos = [np.flatnonzero(labels == k).astype(np.int64) for k in description.label_keys]
    return pos, [np.zeros(0, dtype=np.int64) for _ in pos]


def encode_labels(
    raw: np.ndarray, episode_description: TaskDescription, task_description: TaskDescription
) -> np.ndarray:
    """Episode labels (numpy, see module doc) of raw stored labels ``raw`` of some items.

    ``episode_description`` is the task description restricted to the episode's classes
    (:meth:`TaskDescription.subset`); raw keys outside it raise.
    """
    target = task_description.task_target
    raw = np.asarray(raw)
    where = episode_description.task_identifier
    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        cols = np.asarray(episode_description.label_keys, dtype=np.int64)
        if raw.ndim != 2 or (len(cols) and cols.max() >= raw.shape[1]):
            raise ValueError(f"{where}: multi-label labels of shape {raw.shape} lack columns {cols.tolist()}")
        return raw[:, cols].astype(np.float32)
    if target is TaskTarget.BINARY_CLASSIFICATION:
        flat = _flat_binary(raw)
        return (flat == positive_key(task_description)).astype(np.float32)[:, None]
    keys = np.asarray(episode_description.label_keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    found = np.searchsorted(keys[order], raw)
    found = np.clip(found, 0, len(keys) - 1)
    bad = keys[order][found] != raw
    if bad.any():
        raise ValueError(
            f"{where}: raw labels {np.unique(raw[bad]).tolist()[:10]} are not among the episode's "
            f"class keys {keys.tolist()}"
        )
    return order[found].astype(np.int64)


def labels_to_tensor(labels: np.ndarray, target: TaskTarget) -> Tensor:
    """Episode labels as the tensor dtype learners expect (int64 or float32)."""
    if TaskTarget.parse(target).uses_sigmoid:
        return torch.as_tensor(np.asarray(labels, dtype=np.float32))
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


def ordered_class_positions(positions: Sequence[int], description: TaskDescription) -> list[int]:
    """Class positions sorted so the episode keeps description order (ordinal: key order)."""
    positions = [int(p) for p in positions]
    if description.task_target is TaskTarget.ORDINAL_REGRESSION:
        return sorted(positions, key=lambda p: (description.label_keys[p], p))
    return sorted(positions)
