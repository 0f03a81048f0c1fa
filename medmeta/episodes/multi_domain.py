"""Multi-domain episode sampling for meta-training: which task does episode ``k`` come from?

Every episode first picks a task across datasets and domains with a chosen weighting, then
draws the episode from that task's sampler (fixed or variable way/shot, see
:mod:`medmeta.episodes.samplers`). Weightings, with ``n_i`` the number of items of task ``i``
in the split:

* ``"uniform"``: every task equally often (MedIMeta mm-MAML, Meta-Dataset's uniform source);
* ``"size"``: proportional to ``n_i`` (every image equally often);
* ``"tempered"``: proportional to ``n_i ** (1 / temperature)``, between the two (temperature 1
  is ``"size"``, large temperatures approach ``"uniform"``), as in multilingual / multi-task
  sampling.

The task of episode ``k`` is drawn with ``np.random.default_rng([seed, k, 1])`` and the episode
itself with the task sampler's ``[seed, k]``: any episode is reproducible on its own, in any
process. Meta-train from ``split="train"``; validation episodes come from a second sampler with
``split="val"`` (or a frozen episode list).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from medmeta.data.source import TaskSource
from medmeta.episodes.labels import SUPPORTED_TARGETS
from medmeta.episodes.provider import SourceProvider, SourcesLike, task_key
from medmeta.episodes.samplers import (
    EpisodeSampler,
    FewShotSampler,
    InsufficientDataError,
    VariableFewShotSampler,
    episode_rng,
)
from medmeta.episodes.spec import EpisodeSpec
from medmeta.episodes.stream import EpisodeStream, collate_episodes
from medmeta.tasks import TaskTarget

__all__ = ["MultiDomainSampler", "EpisodeStream", "collate_episodes", "task_weights"]

WEIGHTINGS = ("uniform", "size", "tempered")


def task_weights(
    sizes: "Sequence[int] | np.ndarray", weighting: str = "uniform", temperature: float = 2.0
) -> np.ndarray:
    """Probabilities of picking each task (see module doc)."""
    counts = np.asarray(sizes, dtype=np.float64)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    if len(counts) == 0:
        raise ValueError("task_weights: no tasks")
    if weighting == "uniform":
        w = np.ones_like(counts)
    elif weighting == "size":
        w = counts
    else:
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        w = counts ** (1.0 / float(temperature))
    if not np.all(w > 0):
        raise ValueError(f"task_weights: every task needs at least one item, got sizes {counts.tolist()}")
    return w / w.sum()


class MultiDomainSampler:
    """Episodes from many tasks of a meta-dataset, one task per episode.

    Args:
        meta_dataset: a meta-dataset (``.tasks``, ``.source(dataset_id, task_name, split=...)``)
            or a mapping of ``(dataset_id, task_name)`` to task sources.
        tasks: ``(dataset_id, task_name)`` pairs or task entries; ``None``: every classification
            task of the meta-dataset (others are listed in ``excluded_tasks``).
        weighting, temperature: how often each task is picked (module doc).
        split: the split episodes come from (``"train"``; ``"val"`` for validation episodes).
        n_way, n_shot: fixed way/shot (binary tasks are always 2-way); or
        way_range, shot_range: variable way/shot per episode (then ``n_way``/``n_shot`` must be
            left out).
        n_query: query images per class.
        seed: the seed of every choice (see module doc).
        on_insufficient: ``"error"``, or ``"skip"`` classes without enough images and tasks that
            cannot form episodes at all (listed in ``skipped_tasks``, with a warning).
    """

    def __init__(
        self,
        meta_dataset: SourcesLike,
        tasks: Optional[Sequence[Any]] = None,
        weighting: str = "uniform",
        temperature: float = 2.0,
        split: str = "train",
        n_way: Optional[int] = None,
        n_shot: Optional[int] = None,
        n_query: int = 10,
        way_range: Optional[tuple[int, Optional[int]]] = None,
        shot_range: Optional[tuple[int, int]] = None,
        seed: int = 0,
        on_insufficient: str = "error",
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        self.variable = way_range is not None or shot_range is not None
        if self.variable and (n_way is not None or n_shot is not None):
            raise ValueError("give either n_way/n_shot (fixed episodes) or way_range/shot_range (variable), not both")
        self.provider = SourceProvider(meta_dataset, split=split)
        self.split = split
        self.weighting = weighting
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.on_insufficient = on_insufficient
        self.episode_kwargs: dict[str, Any]
        if self.variable:
            self.episode_kwargs = {
                "way_range": tuple(way_range) if way_range is not None else (2, None),
                "shot_range": tuple(shot_range) if shot_range is not None else (1, 10),
                "n_query": n_query,
            }
        else:
            self.episode_kwargs = {"n_way": n_way, "n_shot": 5 if n_shot is None else n_shot, "n_query": n_query}

        self.excluded_tasks: list[dict[str, Any]] = []
        self.skipped_tasks: list[dict[str, Any]] = []
        self.skipped_classes: list[dict[str, Any]] = []
        if tasks is None:
            candidates = []
            for entry in self.provider.task_entries():
                key = task_key(entry)
                target = getattr(entry, "target", None)
                if target is not None and TaskTarget.parse(target) not in SUPPORTED_TARGETS:
                    self.excluded_tasks.append({"task": key, "reason": f"target {TaskTarget.parse(target).value}"})
                    continue
                candidates.append(key)
            explicit = False
        else:
            candidates = [task_key(t) for t in tasks]
            explicit = True
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"tasks: duplicates in {candidates}")

        self._samplers: dict[tuple[str, str], EpisodeSampler] = {}
        self._pid = os.getpid()
        kept, sizes = [], []
        for key in candidates:
            source = self.provider.get(*key)
            if source.description.task_target not in SUPPORTED_TARGETS:
                if explicit:
                    raise ValueError(
                        f"task {key[0]!r}/{key[1]!r}: target {source.description.task_target.value} cannot "
                        f"form classification episodes"
                    )
                self.excluded_tasks.append({"task": key, "reason": f"target {source.description.task_target.value}"})
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # class skips are reported once, below
                    sampler = self._make_sampler(source)
            except InsufficientDataError as exc:
                if on_insufficient != "skip":
                    raise
                self.skipped_tasks.append({"task": key, "reason": str(exc)})
                continue
            self.skipped_classes.extend(sampler.skipped)
            self._samplers[key] = sampler
            kept.append(key)
            sizes.append(len(source))
        if self.skipped_tasks or self.skipped_classes:
            warnings.warn(
                f"MultiDomainSampler ({split}): skipped {len(self.skipped_tasks)} task(s) and "
                f"{len(self.skipped_classes)} class(es) of other tasks without enough images: tasks "
                f"{[s['task'] for s in self.skipped_tasks]}, classes "
                f"{[(s['dataset_id'], s['task_name'], s['class']) for s in self.skipped_classes]} "
                f"(details in .skipped_tasks / .skipped_classes)",
                stacklevel=2,
            )
        if not kept:
            raise InsufficientDataError(
                f"MultiDomainSampler ({split}): no task can form episodes; skipped {self.skipped_tasks}, "
                f"excluded {self.excluded_tasks}"
            )
        self.tasks: list[tuple[str, str]] = kept
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.probabilities = task_weights(self.sizes, weighting, temperature)

    def _make_sampler(self, source: TaskSource) -> EpisodeSampler:
        kwargs = dict(self.episode_kwargs)
        is_binary = source.description.task_target is TaskTarget.BINARY_CLASSIFICATION
        if self.variable:
            return VariableFewShotSampler(source, seed=self.seed, on_insufficient=self.on_insufficient, **kwargs)
        if is_binary:
            kwargs["n_way"] = None
        elif kwargs["n_way"] is not None and kwargs["n_way"] > source.description.num_classes:
            raise InsufficientDataError(
                f"task {source.description.task_identifier!r} has {source.description.num_classes} classes, "
                f"fewer than n_way={kwargs['n_way']}"
            )
        return FewShotSampler(source, seed=self.seed, on_insufficient=self.on_insufficient, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_samplers"] = {}  # rebuilt lazily in each process from its own sources
        return state

    def sampler_for(self, dataset_id: str, task_name: str) -> EpisodeSampler:
        """The per-task sampler (rebuilt lazily after a fork or unpickling)."""
        key = (dataset_id, task_name)
        if os.getpid() != self._pid:
            self._samplers, self._pid = {}, os.getpid()
        if key not in self._samplers:
            if key not in self.tasks:
                raise KeyError(f"task {dataset_id!r}/{task_name!r} is not among this sampler's tasks")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported once, at construction
                self._samplers[key] = self._make_sampler(self.provider.get(*key))
        return self._samplers[key]

    def source_for(self, dataset_id: str, task_name: str) -> TaskSource:
        return self.provider.get(dataset_id, task_name)

    def task_of(self, episode_number: int) -> tuple[str, str]:
        """The task episode ``episode_number`` is drawn from."""
        rng = episode_rng(self.seed, episode_number, 1)
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]

    def sample(self, episode_number: int) -> EpisodeSpec:
        return self.sampler_for(*self.task_of(episode_number)).sample(episode_number)

    def specs(self, count: int, start: int = 0) -> list[EpisodeSpec]:
        return [self.sample(k) for k in range(start, start + int(count))]

    def summary(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "weighting": self.weighting,
            "temperature": self.temperature,
            "tasks": [
                {"task": t, "items": int(n), "probability": float(p)}
                for t, n, p in zip(self.tasks, self.sizes, self.probabilities)
            ],
            "skipped_tasks": list(self.skipped_tasks),
            "skipped_classes": list(self.skipped_classes),
            "excluded_tasks": list(self.excluded_tasks),
        }
