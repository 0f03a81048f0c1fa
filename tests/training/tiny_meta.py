"""A stand-in meta-dataset with the MetaDataset interface (``tasks``, ``source``, ``held_out``).

Three datasets in two domains; images are 1-channel 16x16, a fixed random pattern per class
plus noise, so a few training steps change a learner measurably. ``held_out`` leaves out the
target and the datasets listed as its overlaps, as MedIMeta's info.yaml files describe them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from medmeta.data.array_source import ArrayTaskSource
from medmeta.tasks import TaskDescription, TaskTarget

SPLIT_SIZES = {"train": 60, "val": 40, "test": 40}


@dataclass(frozen=True)
class Entry:
    dataset_id: str
    task_name: str
    domain: str
    target: str
    num_classes: int
    num_samples: int
    description: str = ""


class TinyMetaDataset:
    SPECS = (
        # dataset id, domain, task name, target, classes
        ("alpha", "dermoscopy", "lesion", "MULTICLASS_CLASSIFICATION", 4),
        ("alpha", "dermoscopy", "malignant", "BINARY_CLASSIFICATION", 2),
        ("beta", "dermoscopy", "grade", "ORDINAL_REGRESSION", 3),
        ("gamma", "x-ray", "finding", "MULTICLASS_CLASSIFICATION", 3),
    )
    OVERLAPS = {"alpha": ["beta"], "beta": ["alpha"], "gamma": []}

    def __init__(self, ids: Optional[list[str]] = None, size: int = 16, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.specs = [s for s in self.SPECS if ids is None or s[0] in ids]
        self._cache: dict = {}

    @property
    def tasks(self) -> list[Entry]:
        return [Entry(d, t, dom, tgt, k, sum(SPLIT_SIZES.values())) for d, dom, t, tgt, k in self.specs]

    def _spec(self, dataset_id: str, task_name: str):
        for s in self.specs:
            if s[0] == dataset_id and s[2] == task_name:
                return s
        raise KeyError(f"no task {dataset_id}/{task_name}")

    def source(self, dataset_id: str, task_name: str, split: str = "train") -> ArrayTaskSource:
        key = (dataset_id, task_name, split)
        if key in self._cache:
            return self._cache[key]
        d, dom, t, tgt, k = self._spec(dataset_id, task_name)
        n = SPLIT_SIZES[split]
        index = self.specs.index((d, dom, t, tgt, k))
        split_no = list(SPLIT_SIZES).index(split)
        rng = np.random.default_rng([self.seed, index, split_no])
        patterns = np.random.default_rng([self.seed, index]).normal(0, 1, (k, 1, self.size, self.size))
        labels = np.arange(n) % k
        rng.shuffle(labels)
        images = patterns[labels] + rng.normal(0, 0.8, (n, 1, self.size, self.size))
        desc = TaskDescription(
            TaskTarget.parse(tgt), tuple(f"c{j}" for j in range(k)), f"{d}: {t}", dom,
            dataset_id=d, task_name=t,
        )
        offset = 10_000 * split_no
        src = ArrayTaskSource(images.astype(np.float32), labels, desc, image_indices=np.arange(n) + offset, split=split)
        self._cache[key] = src
        return src

    def held_out(self, target: str) -> "TinyMetaDataset":
        drop = {target, *self.OVERLAPS.get(target, [])}
        return TinyMetaDataset([s[0] for s in self.specs if s[0] not in drop], self.size, self.seed)
