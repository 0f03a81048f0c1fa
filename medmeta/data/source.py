"""TaskSource: one task of one dataset as a torch Dataset, with labels available without images.

Samplers read ``labels`` to pick indices and call ``read_images`` once per episode, so an
episode costs one sorted read instead of one read per image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from medmeta.tasks import TaskDescription

__all__ = ["TaskSource"]


class TaskSource(Dataset):
    """Abstract task source.

    Attributes:
        description: the task (target, classes with their raw ``label_keys``, identifiers).
        labels: raw stored labels of every item, ``(N,)`` keys or ``(N, K)`` 0/1 for multi-label.
        image_indices: the dataset's image index of every item (``int64``, ``(N,)``), so an
            episode can record and replay exactly which images it used.
        split: the split name(s) this source covers (free-form, for reports).
    """

    description: TaskDescription
    labels: np.ndarray
    image_indices: np.ndarray
    split: str = ""

    def __len__(self) -> int:
        return int(len(self.image_indices))

    def read_images(self, positions: Sequence[int]) -> Tensor:
        """Images at item ``positions`` as a float tensor ``(B, C, H, W)``, in the order given."""
        raise NotImplementedError

    def positions_of(self, image_indices: Sequence[int]) -> np.ndarray:
        """Item positions of dataset image indices; raises if one is not in this source."""
        lookup = getattr(self, "_position_lookup", None)
        if lookup is None:
            lookup = {int(i): p for p, i in enumerate(self.image_indices)}
            self._position_lookup = lookup
        missing = [int(i) for i in image_indices if int(i) not in lookup]
        if missing:
            raise KeyError(
                f"{self.description.task_identifier} ({self.split}): image indices {missing[:10]} "
                f"are not in this source"
            )
        return np.asarray([lookup[int(i)] for i in image_indices], dtype=np.int64)
