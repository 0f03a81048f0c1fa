"""A task source over in-memory arrays: user tensors, challenge inputs, tests."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from medmeta.data.source import TaskSource
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = ["ArrayTaskSource"]


class ArrayTaskSource(TaskSource):
    """Images ``(N, C, H, W)`` float (or ``(N, H, W[, C])`` uint8) with raw labels.

    ``labels`` are raw keys ``(N,)`` matching ``description.label_keys``, or ``(N, K)`` 0/1 for
    multi-label tasks, exactly as a MedIMeta label file stores them.
    """

    def __init__(
        self,
        images: "np.ndarray | Tensor",
        labels: np.ndarray,
        description: TaskDescription,
        image_indices: Optional[np.ndarray] = None,
        split: str = "memory",
    ) -> None:
        images_t = torch.as_tensor(images)
        if images_t.dtype == torch.uint8:
            if images_t.ndim == 3:
                images_t = images_t[:, None]
            elif images_t.ndim == 4 and images_t.shape[-1] in (1, 3):
                images_t = images_t.permute(0, 3, 1, 2)
            images_t = images_t.float().div(255.0).sub(0.5).div(0.5)
        if images_t.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W) floats or (N, H, W[, C]) uint8, got {tuple(images_t.shape)}")
        labels = np.asarray(labels)
        if len(labels) != len(images_t):
            raise ValueError(f"labels: {len(labels)} labels for {len(images_t)} images")
        target = description.task_target
        if target is TaskTarget.MULTILABEL_CLASSIFICATION:
            if labels.ndim != 2 or labels.shape[1] != description.num_classes:
                raise ValueError(
                    f"labels: multi-label task {description.task_identifier} expects shape "
                    f"(N, {description.num_classes}), got {labels.shape}"
                )
        else:
            unknown = sorted(set(np.unique(labels).tolist()) - set(description.label_keys))
            if unknown:
                raise ValueError(
                    f"labels: values {unknown[:10]} are not label keys {list(description.label_keys)} "
                    f"of {description.task_identifier}"
                )
        self.images = images_t.contiguous()
        self.labels = labels
        self.description = description
        self.image_indices = (
            np.arange(len(labels), dtype=np.int64) if image_indices is None else np.asarray(image_indices, dtype=np.int64)
        )
        self.split = split

    def read_images(self, positions: Sequence[int]) -> Tensor:
        return self.images[torch.as_tensor(np.asarray(positions, dtype=np.int64))]

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.images[position], torch.as_tensor(self.labels[position])
