"""TaskSource: one task of one dataset as a torch Dataset, with labels available without images.

Samplers read ``labels`` to pick indices and call ``read_images`` once per episode, so an
episode costs one sorted read instead of one read per image.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from medmeta.tasks import TaskDescription

__all__ = ["Positions", "TaskSource", "unique_indices"]

Positions = Union[Sequence[int], np.ndarray]
"""Item positions: a sequence of ints or a 1-d integer array."""


def unique_indices(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(unique, inverse, in_order)`` of 1-d ``indices``: the sorted distinct values (one read
    each), ``unique[inverse] == indices``, and whether ``indices`` were already sorted and
    distinct (then ``unique`` is ``indices`` and no reordering is needed)."""
    unique, inverse = np.unique(indices, return_inverse=True)
    inverse = inverse.reshape(-1)
    in_order = len(unique) == len(indices) and bool(np.array_equal(inverse, np.arange(len(indices))))
    return unique, inverse, in_order


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

    def read_images(self, positions: Positions) -> Tensor:
        """Images at item ``positions`` as a float tensor ``(B, C, H, W)``, in the order given."""
        raise NotImplementedError

    def check_positions(self, positions: Positions) -> np.ndarray:
        """``positions`` as a 1-d ``int64`` array; raises ``TypeError`` for non-integers and
        ``IndexError`` (naming the task and the bad positions) outside ``0..len - 1``."""
        pos = np.asarray(positions)
        if pos.size == 0:
            return np.zeros(0, dtype=np.int64)
        if pos.dtype.kind not in "iu" or pos.ndim != 1:
            raise TypeError(f"positions: expected a 1-d sequence of integer item positions, got {pos.dtype} {pos.shape}")
        n = len(self)
        if pos.min() < 0 or pos.max() >= n:
            bad = pos[(pos < 0) | (pos >= n)][:10].tolist()
            raise IndexError(
                f"{self.description.task_identifier} ({self.split}): positions {bad} out of range 0..{n - 1}"
            )
        return pos.astype(np.int64, copy=False)

    def positions_of(self, image_indices: Positions) -> np.ndarray:
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
