"""Input checks shared by the learners: clear errors before any computation starts.

Every learner validates a support set (image shape, labels in the episode encoding, every
class present) and a query batch (same channel count as the support) the same way, so a
mistake is reported in terms of the task and the argument, not as a shape error deep inside
a backbone.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from medmeta.errors import DataFormatError
from medmeta.learners.heads import check_labels
from medmeta.tasks import Episode, TaskDescription, TaskTarget

__all__ = [
    "check_images",
    "check_support",
    "check_support_features",
    "check_query_features",
    "check_query",
    "check_episodes",
    "missing_classes",
    "feature_dim",
]


def check_images(images: Any, where: str) -> None:
    """Images must be a float tensor ``(B, C, H, W)``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor of images (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise DataFormatError(f"{where}: expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise DataFormatError(f"{where}: expected floating-point images, got {images.dtype}")
    if images.shape[0] == 0:
        raise DataFormatError(f"{where}: the batch is empty")


def missing_classes(labels: Tensor, description: TaskDescription) -> list[str]:
    """Human-readable names of what the support set lacks (classes, positives, negatives)."""
    target = description.task_target
    missing: list[str] = []
    if target is TaskTarget.BINARY_CLASSIFICATION:
        col = labels.reshape(-1)
        pos_name = description.classes[1] if description.num_classes > 1 else "positive"
        neg_name = description.classes[0]
        if not bool((col == 1).any()):
            missing.append(f"positive class {pos_name!r}")
        if not bool((col == 0).any()):
            missing.append(f"negative class {neg_name!r}")
    elif target is TaskTarget.MULTILABEL_CLASSIFICATION:
        has_pos = (labels == 1).any(dim=0)
        has_neg = (labels == 0).any(dim=0)
        for k, name in enumerate(description.classes):
            if not bool(has_pos[k]):
                missing.append(f"positives of label {name!r}")
            if not bool(has_neg[k]):
                missing.append(f"negatives of label {name!r}")
    else:
        present = torch.bincount(labels.reshape(-1).long().cpu(), minlength=description.num_classes)
        missing = [f"class {name!r}" for k, name in enumerate(description.classes) if int(present[k]) == 0]
    return missing


def _check_support_labels(
    labels: Tensor, n_items: int, what: str, description: TaskDescription, require_all_classes: bool
) -> None:
    where = f"support set of {description.task_identifier}"
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    check_labels(labels, description, where=f"{where}: labels")
    if len(labels) != n_items:
        raise DataFormatError(f"{where}: {n_items} {what} but {len(labels)} labels")
    if require_all_classes:
        missing = missing_classes(labels, description)
        if missing:
            raise DataFormatError(
                f"{where}: no examples of {', '.join(missing)}; every class of the episode "
                f"({list(description.classes)}) needs support examples"
            )


def check_support(
    images: Tensor, labels: Tensor, description: TaskDescription, require_all_classes: bool = True
) -> None:
    """Validate a support set; with ``require_all_classes`` every class must have examples."""
    check_images(images, f"support set of {description.task_identifier}: images")
    _check_support_labels(labels, len(images), "images", description, require_all_classes)


def check_support_features(
    features: Tensor, labels: Tensor, description: TaskDescription, dim: int, require_all_classes: bool = True
) -> None:
    """Validate cached support features ``(N, dim)`` and their labels."""
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != dim:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise DataFormatError(
            f"support features of {description.task_identifier}: expected (N, {dim}), got {shape}"
        )
    _check_support_labels(labels, len(features), "feature rows", description, require_all_classes)


def check_query_features(query_features: Tensor, dim: int, description: TaskDescription) -> None:
    """Cached query features must be ``(N, dim)``."""
    if not isinstance(query_features, Tensor) or query_features.ndim != 2 or query_features.shape[1] != dim:
        shape = tuple(query_features.shape) if isinstance(query_features, Tensor) else type(query_features).__name__
        raise DataFormatError(f"query features of {description.task_identifier}: expected (N, {dim}), got {shape}")


def check_query(query_images: Tensor, support_images: Tensor, description: TaskDescription) -> None:
    """The query batch must be images with the support set's channel count."""
    where = f"query images of {description.task_identifier}"
    check_images(query_images, where)
    if query_images.shape[1] != support_images.shape[1]:
        raise DataFormatError(
            f"{where}: {query_images.shape[1]} channels, but the support set has "
            f"{support_images.shape[1]} (shape {tuple(query_images.shape)} vs {tuple(support_images.shape)})"
        )


def check_episodes(episodes: Sequence[Episode], require_all_classes: bool = True) -> None:
    """Validate a meta-batch: support, query images and query labels of every episode."""
    if len(episodes) == 0:
        raise DataFormatError("episodes: the meta-batch is empty")
    for i, ep in enumerate(episodes):
        if not isinstance(ep, Episode):
            raise TypeError(f"episodes[{i}]: expected an Episode, got {type(ep).__name__}")
        check_support(ep.support_images, ep.support_labels, ep.description, require_all_classes)
        check_query(ep.query_images, ep.support_images, ep.description)
        check_labels(ep.query_labels, ep.description, where=f"query labels of {ep.description.task_identifier}")
        if len(ep.query_labels) != len(ep.query_images):
            raise DataFormatError(
                f"query set of {ep.description.task_identifier}: {len(ep.query_images)} images but "
                f"{len(ep.query_labels)} labels"
            )


def feature_dim(backbone: nn.Module) -> int:
    """The backbone's pooled feature size (``num_features``, as timm and medmeta backbones have)."""
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int) or dim <= 0:
        raise DataFormatError(
            f"backbone {type(backbone).__name__} has no positive integer attribute num_features; "
            f"use medmeta.backbones.create_backbone or set num_features on your module"
        )
    return dim
