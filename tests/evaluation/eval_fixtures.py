"""Helpers for evaluation tests: sources whose images carry their class, and a tiny learner."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from medmeta.data.array_source import ArrayTaskSource
from medmeta.learners.base import Learner
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.tasks import TaskDescription


def class_source(
    target: str = "MULTICLASS_CLASSIFICATION",
    counts: Sequence[int] = (30, 30, 30),
    keys: Sequence[int] | None = None,
    noise: float = 0.5,
    n_items: int = 120,
    n_labels: int = 3,
    seed: int = 0,
    dataset_id: str = "toy",
    task_name: str = "task",
    split: str = "test",
) -> ArrayTaskSource:
    """Images ``(N, 1, 8, 8)`` whose pixels are the class position (multi-label: a bit code) plus noise."""
    rng = np.random.default_rng(seed)
    if target == "MULTILABEL_CLASSIFICATION":
        labels = (rng.random((n_items, n_labels)) < 0.4).astype(np.int64)
        signal = labels @ (2.0 ** np.arange(n_labels))
        classes, keys = tuple(f"label{j}" for j in range(n_labels)), tuple(range(n_labels))
    else:
        keys = tuple(keys) if keys is not None else tuple(range(len(counts)))
        classes = tuple(f"class{k}" for k in keys)
        positions = np.concatenate([np.full(c, p) for p, c in enumerate(counts)])
        positions = positions[rng.permutation(len(positions))]
        labels = np.asarray(keys)[positions]
        signal = positions.astype(np.float64) * 2.0
    n = len(labels)
    images = signal[:, None, None, None] + noise * rng.standard_normal((n, 1, 8, 8))
    description = TaskDescription(
        target, classes, f"{dataset_id}: {task_name}", f"{dataset_id}-domain", label_keys=keys,
        dataset_id=dataset_id, task_name=task_name,
    )
    return ArrayTaskSource(torch.as_tensor(images, dtype=torch.float32), labels, description, split=split)


class TinyCentroidLearner(FrozenFeatureLearner):
    """Nearest centroid on features of a fixed random conv (a frozen backbone); sigmoid tasks use
    a positive and a negative centroid per label."""

    frozen_backbone = True

    def __init__(self, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, dim, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.embed_calls = 0

    def embed(self, images: Tensor) -> Tensor:
        self.embed_calls += 1
        return torch.relu(self.conv(images)).mean(dim=(2, 3))

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription):
        def dist(x: Tensor, p: Tensor) -> Tensor:
            return torch.cdist(x, p) ** 2

        if description.task_target.uses_sigmoid:
            y = support_labels.float()
            pos = (y.T @ support_features) / y.sum(0).clamp_min(1)[:, None]
            neg = ((1 - y).T @ support_features) / (1 - y).sum(0).clamp_min(1)[:, None]
            return lambda q: dist(q, neg) - dist(q, pos)
        onehot = torch.nn.functional.one_hot(support_labels, description.num_classes).float()
        protos = (onehot.T @ support_features) / onehot.sum(0)[:, None]
        return lambda q: -dist(q, protos)


class RandomGuessLearner(Learner):
    """Not frozen: random logits from the torch RNG (tests per-episode seeding)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def adapt(self, support_images, support_labels, description):
        return lambda q: torch.randn(len(q), description.num_outputs)
