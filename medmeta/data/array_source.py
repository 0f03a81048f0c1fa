"""A task source over in-memory arrays: user tensors, challenge inputs, tests."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from medmeta.data.source import Positions, TaskSource
from medmeta.data.transforms import ImageTransform, check_channels
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = ["ArrayTaskSource"]


class ArrayTaskSource(TaskSource):
    """Images ``(N, C, H, W)`` float (taken as model-ready), or uint8 ``(N, H, W)``,
    ``(N, H, W, C)`` or ``(N, C, H, W)`` (``C`` 1 or 3) with raw labels.

    uint8 images go through :class:`~medmeta.data.transforms.ImageTransform` once, as a MedIMeta
    source would read them: ``channels`` (``None``: as stored, 1: grey, 3: RGB) and ``normalize``
    (default: the official mean = std = 0.5). ``labels`` are raw keys ``(N,)`` matching
    ``description.label_keys``, or ``(N, K)`` 0/1 for multi-label tasks, exactly as a MedIMeta
    label file stores them.
    """

    def __init__(
        self,
        images: "np.ndarray | Tensor",
        labels: np.ndarray,
        description: TaskDescription,
        image_indices: Optional[np.ndarray] = None,
        split: str = "memory",
        *,
        channels: Optional[int] = None,
        normalize: Optional[str] = "official",
    ) -> None:
        channels = check_channels(channels)
        images_t = torch.as_tensor(images)
        if images_t.dtype == torch.uint8:
            images_t = _convert_uint8(images_t, channels, normalize)
        elif channels is not None and images_t.ndim == 4 and images_t.shape[1] != channels:
            raise ValueError(
                f"channels={channels}: float images are used as given and have {images_t.shape[1]} channels; "
                f"pass uint8 images to convert them"
            )
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

    def read_images(self, positions: Positions) -> Tensor:
        return self.images[torch.as_tensor(np.asarray(positions, dtype=np.int64))]

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.images[position], torch.as_tensor(self.labels[position])


def _convert_uint8(images: Tensor, channels: Optional[int], normalize: Optional[str]) -> Tensor:
    """uint8 ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> float ``(N, C', H, W)``."""
    array = images.numpy()
    if array.ndim == 4 and array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = np.moveaxis(array, 1, -1)  # channels first -> channels last
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
        raise ValueError(f"images: expected uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got {array.shape}")
    stored = 1 if array.ndim == 3 else 3
    return ImageTransform(channels or stored, None, normalize)(array)
