"""The shared vocabulary of medmeta: task targets, task descriptions and episodes.

Everything else (readers, samplers, learners, protocols, adapters) speaks in these types, so
they live in one small module with no heavy imports.

Label encoding inside an :class:`Episode` (and everywhere a learner sees labels):

* ``MULTICLASS_CLASSIFICATION`` / ``ORDINAL_REGRESSION``: ``int64`` of shape ``(N,)`` holding
  class positions ``0..n_way-1`` (ordinal keys remapped in key order).
* ``BINARY_CLASSIFICATION``: ``float32`` of shape ``(N, 1)`` holding 0/1 (one sigmoid output).
* ``MULTILABEL_CLASSIFICATION``: ``float32`` of shape ``(N, K)`` holding 0/1.
* ``BINARY_SEGMENTATION`` / ``MULTILABEL_SEGMENTATION``: masks, ``int64`` ``(N, H, W)`` (class
  per pixel, 0 = background) or ``float32`` ``(N, K, H, W)``.

Logits have one column per class, or a single column for binary tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Sequence

import numpy as np

__all__ = ["TaskTarget", "TaskDescription", "Episode"]


class TaskTarget(str, Enum):
    """What a task predicts, with the names MedIMeta's ``info.yaml`` files use."""

    MULTICLASS_CLASSIFICATION = "MULTICLASS_CLASSIFICATION"
    BINARY_CLASSIFICATION = "BINARY_CLASSIFICATION"
    MULTILABEL_CLASSIFICATION = "MULTILABEL_CLASSIFICATION"
    ORDINAL_REGRESSION = "ORDINAL_REGRESSION"
    REGRESSION = "REGRESSION"
    BINARY_SEGMENTATION = "BINARY_SEGMENTATION"
    MULTILABEL_SEGMENTATION = "MULTILABEL_SEGMENTATION"

    @classmethod
    def parse(cls, value: "str | TaskTarget", where: str = "task_target") -> "TaskTarget":
        """Parse a target name, with an error that names ``where`` and the valid names."""
        if isinstance(value, TaskTarget):
            return value
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise ValueError(f"{where}: unknown task target {value!r}; expected one of {valid}") from None

    @property
    def is_classification(self) -> bool:
        return self in _CLASSIFICATION

    @property
    def is_segmentation(self) -> bool:
        return self in (TaskTarget.BINARY_SEGMENTATION, TaskTarget.MULTILABEL_SEGMENTATION)

    @property
    def uses_sigmoid(self) -> bool:
        """Binary and multi-label tasks have independent sigmoid outputs; the others softmax."""
        return self in (TaskTarget.BINARY_CLASSIFICATION, TaskTarget.MULTILABEL_CLASSIFICATION)


_CLASSIFICATION = (
    TaskTarget.MULTICLASS_CLASSIFICATION,
    TaskTarget.BINARY_CLASSIFICATION,
    TaskTarget.MULTILABEL_CLASSIFICATION,
    TaskTarget.ORDINAL_REGRESSION,
)


@dataclass(frozen=True)
class TaskDescription:
    """One task: its target, class names, identifier and domain.

    ``label_keys`` are the raw integer keys of the classes as stored on disk, in the order of
    ``classes`` (MedIMeta's ordinal keys need not be contiguous, e.g. 1, 4, 6, 8, 10). For
    multi-label tasks they are the label columns. ``task_identifier`` is
    ``"<dataset name>: <task name>"`` as in the official loader.
    """

    task_target: TaskTarget
    classes: tuple[str, ...]
    task_identifier: str
    domain_identifier: str
    label_keys: tuple[int, ...] = ()
    dataset_id: str = ""
    task_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_target", TaskTarget.parse(self.task_target))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        keys = tuple(int(k) for k in self.label_keys) or tuple(range(len(self.classes)))
        if len(keys) != len(self.classes):
            raise ValueError(
                f"{self.task_identifier}: {len(keys)} label keys for {len(self.classes)} classes"
            )
        object.__setattr__(self, "label_keys", keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """Logit columns: one for a binary task, else one per class."""
        return 1 if self.task_target is TaskTarget.BINARY_CLASSIFICATION else self.num_classes

    def subset(self, positions: Sequence[int]) -> "TaskDescription":
        """The description of an episode that keeps the classes at ``positions``, in that order."""
        positions = [int(p) for p in positions]
        return replace(
            self,
            classes=tuple(self.classes[p] for p in positions),
            label_keys=tuple(self.label_keys[p] for p in positions),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_target": self.task_target.value,
            "classes": list(self.classes),
            "task_identifier": self.task_identifier,
            "domain_identifier": self.domain_identifier,
            "label_keys": list(self.label_keys),
            "dataset_id": self.dataset_id,
            "task_name": self.task_name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskDescription":
        return cls(
            task_target=TaskTarget.parse(data["task_target"]),
            classes=tuple(data["classes"]),
            task_identifier=data["task_identifier"],
            domain_identifier=data["domain_identifier"],
            label_keys=tuple(data.get("label_keys", ())),
            dataset_id=data.get("dataset_id", ""),
            task_name=data.get("task_name", ""),
        )


@dataclass
class Episode:
    """A few-shot episode: support and query tensors with episode labels (see module doc).

    ``support_indices`` / ``query_indices`` are the original image indices in the dataset, so
    any episode can be written down and replayed; ``info`` holds free-form facts such as the
    dataset id, task name, split, shots and instance number.
    """

    support_images: Any
    support_labels: Any
    query_images: Any
    query_labels: Any
    description: TaskDescription
    support_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    query_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_way(self) -> int:
        return self.description.num_classes

    @property
    def n_support(self) -> int:
        return int(len(self.support_labels))

    @property
    def n_query(self) -> int:
        return int(len(self.query_labels))

    def to(self, device: Any, non_blocking: bool = False) -> "Episode":
        """A copy with the four tensors on ``device``."""
        return replace(
            self,
            support_images=self.support_images.to(device, non_blocking=non_blocking),
            support_labels=self.support_labels.to(device, non_blocking=non_blocking),
            query_images=self.query_images.to(device, non_blocking=non_blocking),
            query_labels=self.query_labels.to(device, non_blocking=non_blocking),
        )
