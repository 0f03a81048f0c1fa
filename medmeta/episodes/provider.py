"""SourceProvider: open task sources by (dataset, task, split), lazily and once per process.

Samplers, episode streams, frozen episode lists and protocols accept "where the images are" in
three forms: a meta-dataset (anything with ``.source(dataset_id, task_name, split=...)``, such as
:class:`medmeta.data.MetaDataset`), a mapping from ``(dataset_id, task_name)`` or
``(dataset_id, task_name, split)`` to a :class:`TaskSource`, or a single ``TaskSource``. Opened
sources are cached per process: a forked DataLoader worker opens its own (file handles are
never shared across processes).
"""
from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Optional, Union

from medmeta.data.source import TaskSource

__all__ = ["SourceProvider", "SourcesLike", "task_key"]

SourcesLike = Union[TaskSource, Mapping[Any, TaskSource], Any]


def task_key(task: Any) -> tuple[str, str]:
    """``(dataset_id, task_name)`` of a task given as a tuple, an entry with those attributes or
    a ``"dataset/task"`` string."""
    if isinstance(task, str):
        if "/" not in task:
            raise ValueError(f"task {task!r}: expected 'dataset_id/task_name'")
        ds, name = task.split("/", 1)
        return ds, name
    if isinstance(task, (tuple, list)) and len(task) == 2:
        return str(task[0]), str(task[1])
    if hasattr(task, "dataset_id") and hasattr(task, "task_name"):
        return str(task.dataset_id), str(task.task_name)
    raise ValueError(
        f"task {task!r}: expected (dataset_id, task_name), a 'dataset_id/task_name' string or an entry "
        f"with .dataset_id and .task_name"
    )


class SourceProvider:
    """Uniform, per-process cached access to task sources (see module doc)."""

    sources: SourcesLike

    def __init__(self, sources: SourcesLike, split: Optional[str] = None) -> None:
        if isinstance(sources, SourceProvider):
            sources = sources.sources
        if not (isinstance(sources, (TaskSource, Mapping)) or hasattr(sources, "source")):
            raise TypeError(
                f"sources: expected a meta-dataset with .source(dataset_id, task_name, split=...), a mapping "
                f"of (dataset_id, task_name[, split]) to TaskSource, or a TaskSource; got {type(sources).__name__}"
            )
        self.sources = sources
        self.split = split
        self._cache: dict[Hashable, TaskSource] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    @property
    def meta_dataset(self) -> Any:
        """The meta-dataset, or ``None`` when sources were given directly."""
        if isinstance(self.sources, (TaskSource, Mapping)):
            return None
        return self.sources

    def get(self, dataset_id: str, task_name: str, split: Optional[str] = None) -> TaskSource:
        """The source of a task (``split`` defaults to the provider's split)."""
        split = split if split is not None else self.split
        if os.getpid() != self._pid:
            self._cache, self._pid = {}, os.getpid()
        key = (dataset_id, task_name, split)
        if key not in self._cache:
            self._cache[key] = self._open(dataset_id, task_name, split)
        return self._cache[key]

    def _open(self, dataset_id: str, task_name: str, split: Optional[str]) -> TaskSource:
        src = self.sources
        if isinstance(src, TaskSource):
            from medmeta.episodes.samplers import task_names

            if task_names(src) != (dataset_id, task_name):
                raise KeyError(
                    f"the given source holds task {task_names(src)}, not {(dataset_id, task_name)}"
                )
            return src
        if isinstance(src, Mapping):
            for key in ((dataset_id, task_name, split), (dataset_id, task_name)):
                if key in src:
                    return src[key]
            raise KeyError(
                f"no source for task {dataset_id!r}/{task_name!r} (split {split!r}); the mapping has "
                f"{list(src.keys())[:10]}"
            )
        if split is None:
            return src.source(dataset_id, task_name)
        return src.source(dataset_id, task_name, split=split)

    def task_entries(self) -> list[Any]:
        """Tasks the provider knows: the meta-dataset's ``.tasks`` or the mapping's keys."""
        if isinstance(self.sources, TaskSource):
            from medmeta.episodes.samplers import task_names

            return [task_names(self.sources)]
        if isinstance(self.sources, Mapping):
            seen = []
            for key in self.sources:
                k = (key[0], key[1])
                if k not in seen:
                    seen.append(k)
            return seen
        return list(self.sources.tasks)
