"""Helpers for learner tests: random episodes of every task kind, tiny backbones, learnable data."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.data.array_source import ArrayTaskSource
from medmeta.tasks import Episode, TaskDescription

TARGETS = ("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION", "ORDINAL_REGRESSION")


def description(target: str, n_classes: int, name: str = "toy: task") -> TaskDescription:
    if target == "BINARY_CLASSIFICATION":
        n_classes = 2
    return TaskDescription(target, tuple(f"c{i}" for i in range(n_classes)), name, "toy-domain")


def labels_for(target: str, n_classes: int, per_class: int, g: torch.Generator) -> Tensor:
    """Episode labels in which every class (and, for sigmoid tasks, both signs) occurs."""
    if target in ("MULTICLASS_CLASSIFICATION", "ORDINAL_REGRESSION"):
        return torch.arange(n_classes).repeat_interleave(per_class)
    if target == "BINARY_CLASSIFICATION":
        return torch.tensor([0.0, 1.0]).repeat_interleave(per_class)[:, None]
    n = max(2, n_classes * per_class)
    y = (torch.rand(n, n_classes, generator=g) > 0.5).float()
    y[0] = 1.0
    y[1] = 0.0
    return y


def random_episode(
    target: str,
    n_classes: int = 3,
    shots: int = 2,
    queries: int = 3,
    size: int = 8,
    channels: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Episode:
    g = torch.Generator().manual_seed(seed)
    d = description(target, n_classes)
    sy = labels_for(target, d.num_classes, shots, g)
    qy = labels_for(target, d.num_classes, queries, g)
    sx = torch.randn(len(sy), channels, size, size, generator=g, dtype=dtype)
    qx = torch.randn(len(qy), channels, size, size, generator=g, dtype=dtype)
    return Episode(sx, sy, qx, qy, d)


class TinyMLP(nn.Module):
    """A two-layer network on flattened images (``tanh`` hidden layer): small enough for Hessians."""

    def __init__(self, in_features: int, hidden: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)
        self.num_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x.flatten(1)))


class Flatten(nn.Module):
    """Identity features: the flattened image (for hand-computed ProtoNet logits)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the learner a device and dtype

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) + 0.0 * self.dummy


# -- learnable synthetic data ----------------------------------------------------------------
def class_templates(n_classes: int, size: int, seed: int) -> Tensor:
    """Smooth random colour patterns ``(n, 3, size, size)``, one per class, unit scale."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n_classes, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def pattern_source(
    target: str,
    n_classes: int,
    per_class: int = 30,
    size: int = 16,
    noise: float = 1.0,
    seed: int = 0,
    name: str = "synthetic: patterns",
) -> ArrayTaskSource:
    """A task source whose classes are noisy versions of class templates.

    Multi-class / ordinal / binary: image = template of its class + Gaussian noise. Multi-label:
    image = sum of the templates of its present labels + noise.
    """
    g = torch.Generator().manual_seed(seed + 1)
    templates = class_templates(n_classes, size, seed)
    if target == "MULTILABEL_CLASSIFICATION":
        n = per_class * n_classes
        labels = (torch.rand(n, n_classes, generator=g) < 0.5).long()
        images = torch.einsum("nk,kchw->nchw", labels.float(), templates)
        labels_np = labels.numpy()
    else:
        labels_np = np.repeat(np.arange(n_classes), per_class)
        images = templates[torch.as_tensor(labels_np)]
    images = images + noise * torch.randn(images.shape, generator=g)
    d = TaskDescription(target, tuple(f"p{i}" for i in range(n_classes)), name, "synthetic")
    return ArrayTaskSource(images, labels_np, d)


def sample_episodes(source: ArrayTaskSource, n_way: Optional[int], shots: int, queries: int, count: int, seed: int) -> list[Episode]:
    """Episodes drawn by the project's seeded sampler."""
    from medmeta.episodes.samplers import FewShotSampler

    sampler = FewShotSampler(source, n_way=n_way, n_shot=shots, n_query=queries, seed=seed)
    return [sampler.sample(k).materialize(source) for k in range(count)]


def accuracy(logits: Tensor, labels: Tensor, target: str) -> float:
    if target in ("BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION"):
        return float(((logits > 0).float() == labels).float().mean())
    return float((logits.argmax(1) == labels).float().mean())
