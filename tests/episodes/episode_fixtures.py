"""Helpers for episode tests: small in-memory task sources whose images encode their position."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from medmeta.data.array_source import ArrayTaskSource
from medmeta.tasks import TaskDescription


def make_source(
    target: str = "MULTICLASS_CLASSIFICATION",
    counts: Sequence[int] = (20, 20, 20),
    keys: Optional[Sequence[int]] = None,
    n_items: int = 200,
    n_labels: int = 3,
    p_positive: float = 0.35,
    seed: int = 0,
    dataset_id: str = "toy",
    task_name: str = "task",
    split: str = "test",
    image_offset: int = 1000,
) -> ArrayTaskSource:
    """A source whose image ``i`` is filled with the value ``i``; image indices are offset so
    positions and original indices differ. Multi-class / ordinal / binary labels hold
    ``counts[c]`` items of class ``c`` (keys ``keys``), multi-label labels are Bernoulli."""
    rng = np.random.default_rng(seed)
    if target == "MULTILABEL_CLASSIFICATION":
        labels = (rng.random((n_items, n_labels)) < p_positive).astype(np.int64)
        classes = tuple(f"label{j}" for j in range(n_labels))
        keys = tuple(range(n_labels))
    else:
        keys = tuple(keys) if keys is not None else tuple(range(len(counts)))
        classes = tuple(f"class{k}" for k in keys)
        labels = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in zip(keys, counts)])
        labels = labels[rng.permutation(len(labels))]
    n = len(labels)
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).clone()
    description = TaskDescription(
        target, classes, f"{dataset_id}: {task_name}", "toy-domain", label_keys=keys,
        dataset_id=dataset_id, task_name=task_name,
    )
    return ArrayTaskSource(images, labels, description, image_indices=np.arange(n) + image_offset, split=split)
