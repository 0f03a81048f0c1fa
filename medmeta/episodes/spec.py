"""EpisodeSpec: an episode written down (which items, which labels), cheap to store and replay.

Samplers produce specs from labels alone; ``materialize`` reads the images of support and
query in one ``read_images`` call. A spec records both the item positions in its source and
the dataset's original image indices, so a frozen episode list can be checked against (and
replayed on) any copy of the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from torch import Tensor

from medmeta.data.source import TaskSource
from medmeta.episodes.labels import labels_to_tensor
from medmeta.tasks import Episode, TaskDescription, TaskTarget

__all__ = ["EpisodeSpec"]


def _ints(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclass(eq=False)
class EpisodeSpec:
    """One few-shot episode by reference.

    Attributes:
        dataset_id, task_name: the task the episode was drawn from.
        description: the episode's task description (kept classes only, in episode order).
        support_positions, query_positions: item positions in the source (``int64``).
        support_indices, query_indices: the dataset's original image indices of those items.
        support_labels, query_labels: episode labels as numpy (encoding of :mod:`medmeta.tasks`).
        shots: support examples per class (per label and sign for binary / multi-label).
        instance: the episode number within its sampler (or protocol instance number).
        seed: the sampler seed; with ``instance`` it determines the episode.
        split: the split the source covers.
        n_query: query examples per class.
    """

    dataset_id: str
    task_name: str
    description: TaskDescription
    support_positions: np.ndarray
    query_positions: np.ndarray
    support_indices: np.ndarray
    query_indices: np.ndarray
    support_labels: np.ndarray
    query_labels: np.ndarray
    shots: int
    instance: int
    seed: int
    split: str = ""
    n_query: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.support_positions = _ints(self.support_positions)
        self.query_positions = _ints(self.query_positions)
        self.support_indices = _ints(self.support_indices)
        self.query_indices = _ints(self.query_indices)
        dtype = np.float32 if self.description.task_target.uses_sigmoid else np.int64
        self.support_labels = np.asarray(self.support_labels, dtype=dtype)
        self.query_labels = np.asarray(self.query_labels, dtype=dtype)
        for part in ("support", "query"):
            n = len(getattr(self, f"{part}_positions"))
            for name in (f"{part}_indices", f"{part}_labels"):
                if len(getattr(self, name)) != n:
                    raise ValueError(
                        f"EpisodeSpec {self.key}: {name} has {len(getattr(self, name))} entries for "
                        f"{n} {part} positions"
                    )
        if self.description.task_target.uses_sigmoid:
            for name in ("support_labels", "query_labels"):
                arr = getattr(self, name)
                if arr.ndim == 1 and len(arr) == 0:
                    arr = arr.reshape(0, self.description.num_outputs)
                    setattr(self, name, arr)
                if arr.ndim != 2 or arr.shape[1] != self.description.num_outputs:
                    raise ValueError(
                        f"EpisodeSpec {self.key}: {name} must have shape (N, {self.description.num_outputs}), "
                        f"got {arr.shape}"
                    )

    @property
    def key(self) -> str:
        return f"{self.dataset_id}/{self.task_name}#{self.instance}"

    @property
    def target(self) -> TaskTarget:
        return self.description.task_target

    @property
    def n_way(self) -> int:
        return self.description.num_classes

    @property
    def n_support(self) -> int:
        return int(len(self.support_positions))

    @property
    def positions(self) -> np.ndarray:
        """Support then query item positions (the order ``materialize`` reads them in)."""
        return np.concatenate([self.support_positions, self.query_positions])

    def info(self) -> dict[str, Any]:
        """Facts stored in :attr:`Episode.info`."""
        return {
            "dataset_id": self.dataset_id,
            "task_name": self.task_name,
            "split": self.split,
            "shots": int(self.shots),
            "instance": int(self.instance),
            "seed": int(self.seed),
            "n_query": int(self.n_query),
            **self.extra,
        }

    def check_source(self, source: TaskSource) -> None:
        """Raise when ``source`` is not the one the episode was drawn from (other split or data)."""
        n = len(source)
        for part in ("support", "query"):
            pos = getattr(self, f"{part}_positions")
            if len(pos) and (pos.min() < 0 or pos.max() >= n):
                raise ValueError(
                    f"episode {self.key}: {part} positions reach {int(pos.max())} but source "
                    f"{source.description.task_identifier} ({source.split}) has {n} items"
                )
            found = np.asarray(source.image_indices, dtype=np.int64)[pos]
            if not np.array_equal(found, getattr(self, f"{part}_indices")):
                raise ValueError(
                    f"episode {self.key}: {part} image indices differ from those of source "
                    f"{source.description.task_identifier} ({source.split}) at the same positions; "
                    f"the episode was drawn from another split or version of the dataset"
                )

    def materialize(
        self,
        source: TaskSource,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
        check: bool = True,
    ) -> Episode:
        """Read support and query images in one ``source.read_images`` call -> :class:`Episode`.

        ``transform`` (optional) maps the batch of all images of the episode to new images
        (e.g. augmentation). ``check`` verifies that the source holds the recorded images.
        """
        if check:
            self.check_source(source)
        images = source.read_images(self.positions)
        if transform is not None:
            images = transform(images)
        n = self.n_support
        return Episode(
            support_images=images[:n],
            support_labels=labels_to_tensor(self.support_labels, self.target),
            query_images=images[n:],
            query_labels=labels_to_tensor(self.query_labels, self.target),
            description=self.description,
            support_indices=self.support_indices.copy(),
            query_indices=self.query_indices.copy(),
            info=self.info(),
        )

    # Serialisation (JSON-friendly, no pickle) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "task_name": self.task_name,
            "split": self.split,
            "description": self.description.to_dict(),
            "shots": int(self.shots),
            "n_query": int(self.n_query),
            "instance": int(self.instance),
            "seed": int(self.seed),
            "support_positions": self.support_positions.tolist(),
            "query_positions": self.query_positions.tolist(),
            "support_indices": self.support_indices.tolist(),
            "query_indices": self.query_indices.tolist(),
            "support_labels": self.support_labels.tolist(),
            "query_labels": self.query_labels.tolist(),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpisodeSpec":
        try:
            return cls(
                dataset_id=str(data["dataset_id"]),
                task_name=str(data["task_name"]),
                description=TaskDescription.from_dict(data["description"]),
                support_positions=data["support_positions"],
                query_positions=data["query_positions"],
                support_indices=data["support_indices"],
                query_indices=data["query_indices"],
                support_labels=data["support_labels"],
                query_labels=data["query_labels"],
                shots=int(data["shots"]),
                instance=int(data["instance"]),
                seed=int(data["seed"]),
                split=str(data.get("split", "")),
                n_query=int(data.get("n_query", 0)),
                extra=dict(data.get("extra", {})),
            )
        except KeyError as exc:
            raise ValueError(f"episode record lacks the field {exc.args[0]!r}") from None

    def same_as(self, other: "EpisodeSpec") -> bool:
        """True when both specs select the same items with the same labels and classes."""
        return (
            self.dataset_id == other.dataset_id
            and self.task_name == other.task_name
            and self.description == other.description
            and np.array_equal(self.support_indices, other.support_indices)
            and np.array_equal(self.query_indices, other.query_indices)
            and np.array_equal(self.support_positions, other.support_positions)
            and np.array_equal(self.query_positions, other.query_positions)
            and np.array_equal(self.support_labels, other.support_labels)
            and np.array_equal(self.query_labels, other.query_labels)
            and self.shots == other.shots
        )
