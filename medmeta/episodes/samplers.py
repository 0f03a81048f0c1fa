"""Seeded few-shot episode samplers over one task source.

Episode semantics follow the MedIMeta authors' sampler (TorchCross ``FewShotMetaDataset``):

* multi-class / ordinal: N classes, K support and Q query images per class, classes remapped to
  ``0..N-1`` (ordinal keys in key order, so gaps such as 1, 4, 6, 8, 10 map in order);
* binary: K positives and K negatives (Q and Q in the query), one sigmoid output kept;
* multi-label: K positives and K negatives for every kept label, drawn per label and then pruned
  greedily to a minimal set that still covers every label (no image can be removed), so the
  support size varies; the query is drawn the same way from the remaining images;
* variable way / shot (Meta-Dataset, TorchCross ``SubTaskRandomFewShotMetaDataset``): every
  episode draws its way from ``way_range`` and its shot from ``shot_range``.

Unlike TorchCross, the RNG of episode ``k`` is ``np.random.default_rng([seed, k])``: episodes are
reproducible across processes, resumable (episode ``k`` does not depend on the episodes before
it) and shardable by rank. A class without enough images raises an error that names the task,
the class and the counts; with ``on_insufficient="skip"`` such classes are left out, counted in
``sampler.skipped`` and reported with a warning. No sampler ever stops early.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np

from medmeta.data.source import TaskSource
from medmeta.episodes.labels import check_supported, class_pools, encode_labels, ordered_class_positions
from medmeta.episodes.spec import EpisodeSpec
from medmeta.errors import InsufficientDataError
from medmeta.tasks import TaskTarget

__all__ = [
    "InsufficientDataError",
    "EpisodeSampler",
    "FewShotSampler",
    "VariableFewShotSampler",
    "episode_rng",
    "task_names",
]


def episode_rng(seed: int, episode_number: int, *stream: int) -> np.random.Generator:
    """The RNG of one episode: independent of every other episode and of the process."""
    if int(seed) < 0 or int(episode_number) < 0:
        raise ValueError(f"seed and episode number must be >= 0, got seed={seed}, episode={episode_number}")
    return np.random.default_rng([int(seed), int(episode_number), *[int(s) for s in stream]])


def task_names(source: TaskSource) -> tuple[str, str]:
    """(dataset_id, task_name) of a source, falling back to the task identifier."""
    d = source.description
    dataset_id = d.dataset_id or d.task_identifier.split(":")[0].strip()
    task_name = d.task_name or d.task_identifier
    return dataset_id, task_name


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _check_mode(on_insufficient: str) -> str:
    if on_insufficient not in ("error", "skip"):
        raise ValueError(f"on_insufficient: expected 'error' or 'skip', got {on_insufficient!r}")
    return on_insufficient


class EpisodeSampler:
    """Base class: class pools, eligibility checks and the drawing of one episode.

    Subclasses implement :meth:`sample` (``episode_number -> EpisodeSpec``).
    """

    def __init__(
        self,
        source: TaskSource,
        n_query: int,
        seed: int,
        needed: int,
        on_insufficient: str,
        needed_text: str,
    ) -> None:
        check_supported(source.description)
        self.source = source
        self.description = source.description
        self.target = source.description.task_target
        self.dataset_id, self.task_name = task_names(source)
        self.split = str(getattr(source, "split", ""))
        self.n_query = _check_int("n_query", n_query, 1)
        self.seed = _check_int("seed", seed, 0)
        self.on_insufficient = _check_mode(on_insufficient)
        self.needed = needed
        self._raw_labels = np.asarray(source.labels)
        self._image_indices = np.asarray(source.image_indices, dtype=np.int64)
        self.positives, self.negatives = class_pools(self._raw_labels, self.description)
        self.skipped: list[dict[str, Any]] = []
        self.eligible = self._eligible_classes(needed, needed_text)

    # -- eligibility -----------------------------------------------------------------------
    @property
    def where(self) -> str:
        return f"task {self.dataset_id!r}/{self.task_name!r} ({self.split or 'all'} split)"

    def _class_name(self, c: int) -> str:
        if self.target is TaskTarget.BINARY_CLASSIFICATION:
            return self.description.classes[1]
        return self.description.classes[c]

    def _eligible_classes(self, needed: int, needed_text: str) -> list[int]:
        uses_negatives = self.target.uses_sigmoid
        short = []
        for c, pos in enumerate(self.positives):
            n_pos, n_neg = len(pos), len(self.negatives[c])
            if n_pos < needed or (uses_negatives and n_neg < needed):
                short.append((c, n_pos, n_neg))
        if not short:
            return list(range(len(self.positives)))
        lines = []
        for c, n_pos, n_neg in short:
            key = self.description.label_keys[c] if self.target is not TaskTarget.BINARY_CLASSIFICATION else (
                self.description.label_keys[1]
            )
            counts = f"{n_pos} positives, {n_neg} negatives" if uses_negatives else f"{n_pos} images"
            lines.append(f"class {self._class_name(c)!r} (key {key}): {counts}")
            self.skipped.append(
                {
                    "dataset_id": self.dataset_id,
                    "task_name": self.task_name,
                    "split": self.split,
                    "class": self._class_name(c),
                    "key": int(key),
                    "positives": int(n_pos),
                    "negatives": int(n_neg) if uses_negatives else None,
                    "needed": int(needed),
                }
            )
        each = "each of positives and negatives" if uses_negatives else "images"
        message = (
            f"{self.where}: {len(short)} class(es) have too few images; need {needed} {each} "
            f"({needed_text}) per class: " + "; ".join(lines)
        )
        if self.on_insufficient == "error":
            self.skipped.clear()
            raise InsufficientDataError(message + ". Pass on_insufficient='skip' to leave them out.")
        warnings.warn(f"skipping {message}", stacklevel=3)
        bad = {c for c, _, _ in short}
        return [c for c in range(len(self.positives)) if c not in bad]

    def _require_classes(self, minimum: int, what: str) -> None:
        if len(self.eligible) < minimum:
            raise InsufficientDataError(
                f"{self.where}: {what} needs at least {minimum} class(es) with enough images, but only "
                f"{len(self.eligible)} of {len(self.positives)} have them"
                + (f" ({len(self.skipped)} skipped: {[s['class'] for s in self.skipped]})" if self.skipped else "")
            )

    # -- drawing ---------------------------------------------------------------------------
    def _choose_classes(self, rng: np.random.Generator, n_way: Optional[int]) -> list[int]:
        if self.target is TaskTarget.BINARY_CLASSIFICATION:
            return [0]
        if n_way is None or n_way >= len(self.eligible):
            chosen = list(self.eligible)
        else:
            chosen = rng.choice(np.asarray(self.eligible), size=n_way, replace=False).tolist()
        return ordered_class_positions(chosen, self.description)

    def _draw(self, rng: np.random.Generator, classes: Sequence[int], shots: int, instance: int) -> EpisodeSpec:
        q = self.n_query
        if self.target is TaskTarget.MULTILABEL_CLASSIFICATION:
            support = self._multilabel_cover(rng, classes, shots, exclude=None, part="support")
            query = self._multilabel_cover(rng, classes, q, exclude=support, part="query")
            episode_description = self.description.subset(classes)
        elif self.target is TaskTarget.BINARY_CLASSIFICATION:
            pos = rng.choice(self.positives[0], size=shots + q, replace=False)
            neg = rng.choice(self.negatives[0], size=shots + q, replace=False)
            support = np.concatenate([neg[:shots], pos[:shots]])
            query = np.concatenate([neg[shots:], pos[shots:]])
            episode_description = self.description
        else:
            s_parts, q_parts = [], []
            for c in classes:
                chosen = rng.choice(self.positives[c], size=shots + q, replace=False)
                s_parts.append(chosen[:shots])
                q_parts.append(chosen[shots:])
            support, query = np.concatenate(s_parts), np.concatenate(q_parts)
            episode_description = self.description.subset(classes)
        support = np.asarray(support, dtype=np.int64)
        query = np.asarray(query, dtype=np.int64)
        return EpisodeSpec(
            dataset_id=self.dataset_id,
            task_name=self.task_name,
            description=episode_description,
            support_positions=support,
            query_positions=query,
            support_indices=self._image_indices[support],
            query_indices=self._image_indices[query],
            support_labels=encode_labels(self._raw_labels[support], episode_description, self.description),
            query_labels=encode_labels(self._raw_labels[query], episode_description, self.description),
            shots=shots,
            instance=instance,
            seed=self.seed,
            split=self.split,
            n_query=q,
        )

    def _multilabel_cover(
        self,
        rng: np.random.Generator,
        classes: Sequence[int],
        k: int,
        exclude: Optional[np.ndarray],
        part: str,
    ) -> np.ndarray:
        """K positives and K negatives per label, pruned greedily to a minimal covering set."""
        picks = []
        excluded = None
        if exclude is not None and len(exclude):
            excluded = np.zeros(len(self._raw_labels), dtype=bool)
            excluded[exclude] = True
        for c in classes:
            for sign, pool in (("positives", self.positives[c]), ("negatives", self.negatives[c])):
                n_out = int(excluded[pool].sum()) if excluded is not None else 0
                if len(pool) - n_out < k:
                    raise InsufficientDataError(
                        f"{self.where}: after drawing the support, label {self.description.classes[c]!r} has "
                        f"{len(pool) - n_out} {sign} left for {k} {part} examples; raise its image count or "
                        f"lower shots/n_query"
                    )
                # k + n_out random items hold at least k allowed ones; the first k of them in the
                # random order are a uniform draw from the allowed items (no O(pool) set difference)
                chosen = rng.choice(pool, size=k + n_out, replace=False)
                if excluded is not None:
                    chosen = chosen[~excluded[chosen]][:k]
                picks.append(chosen)
        union = np.unique(np.concatenate(picks))
        rng.shuffle(union)
        cols = np.asarray([self.description.label_keys[c] for c in classes], dtype=np.int64)
        rows = (self._raw_labels[union][:, cols] == 1).astype(np.int64)  # (m, L)
        # Shortest covering prefix of the shuffled union, then greedy removal (TorchCross's order).
        pos_cum = np.cumsum(rows, axis=0)
        neg_cum = np.cumsum(1 - rows, axis=0)
        covered = np.all((pos_cum >= k) & (neg_cum >= k), axis=1)
        end = int(np.argmax(covered)) + 1  # the full union always covers
        union, rows = union[:end], rows[:end]
        pos_count, neg_count = rows.sum(axis=0), (1 - rows).sum(axis=0)
        keep = np.ones(len(union), dtype=bool)
        for i in range(len(union)):
            r = rows[i]
            if np.all(pos_count - r >= k) and np.all(neg_count - (1 - r) >= k):
                keep[i] = False
                pos_count -= r
                neg_count -= 1 - r
        return union[keep]

    # -- public API ------------------------------------------------------------------------
    def sample(self, episode_number: int) -> EpisodeSpec:
        """The episode with this number (deterministic given the seed)."""
        raise NotImplementedError

    def specs(self, count: int, start: int = 0) -> list[EpisodeSpec]:
        """Episodes ``start .. start + count - 1``."""
        return [self.sample(k) for k in range(start, start + _check_int("count", count, 0))]

    def source_for(self, dataset_id: str, task_name: str) -> TaskSource:
        """The source of an episode this sampler drew (used by :class:`EpisodeStream`)."""
        if (dataset_id, task_name) != (self.dataset_id, self.task_name):
            raise KeyError(f"sampler of {self.where} has no source for {dataset_id!r}/{task_name!r}")
        return self.source

    def summary(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "task_name": self.task_name,
            "split": self.split,
            "eligible_classes": [self._class_name(c) for c in self.eligible],
            "skipped": list(self.skipped),
        }


class FewShotSampler(EpisodeSampler):
    """N-way K-shot episodes with Q query images per class from one task source.

    Args:
        source: the task (any :class:`TaskSource`).
        n_way: classes (labels for multi-label tasks) per episode; ``None`` keeps every class
            with enough images. Binary tasks always have both classes (``None`` or 2).
        n_shot: support images per class (per sign and label for binary / multi-label tasks).
        n_query: query images per class (likewise).
        seed: episode ``k`` uses ``np.random.default_rng([seed, k])``.
        on_insufficient: ``"error"`` (default) or ``"skip"`` classes with fewer than
            ``n_shot + n_query`` images (positives, and negatives where they matter).
    """

    def __init__(
        self,
        source: TaskSource,
        n_way: Optional[int] = None,
        n_shot: int = 5,
        n_query: int = 10,
        seed: int = 0,
        on_insufficient: str = "error",
    ) -> None:
        n_shot = _check_int("n_shot", n_shot, 1)
        n_query_checked = _check_int("n_query", n_query, 1)
        target = source.description.task_target
        num_classes = source.description.num_classes
        if n_way is not None:
            minimum = 1 if target is TaskTarget.MULTILABEL_CLASSIFICATION else 2
            n_way = _check_int("n_way", n_way, minimum)
            if target is TaskTarget.BINARY_CLASSIFICATION and n_way != 2:
                raise ValueError(f"n_way: a binary task has 2 classes, got n_way={n_way}")
            if n_way > num_classes:
                raise ValueError(
                    f"n_way={n_way} but task {source.description.task_identifier!r} has only "
                    f"{num_classes} classes {list(source.description.classes)}"
                )
        self.n_way = n_way
        self.n_shot = n_shot
        super().__init__(
            source,
            n_query_checked,
            seed,
            n_shot + n_query_checked,
            on_insufficient,
            f"{n_shot} shots + {n_query_checked} query",
        )
        if target is TaskTarget.BINARY_CLASSIFICATION:
            self._require_classes(1, "a binary episode")
        elif target is TaskTarget.MULTILABEL_CLASSIFICATION:
            self._require_classes(n_way or 1, f"a {n_way or 'any'}-label episode")
        else:
            self._require_classes(n_way or 2, f"a {n_way or 'multi'}-way episode")

    def sample(self, episode_number: int) -> EpisodeSpec:
        rng = episode_rng(self.seed, episode_number)
        classes = self._choose_classes(rng, self.n_way)
        return self._draw(rng, classes, self.n_shot, int(episode_number))


class VariableFewShotSampler(EpisodeSampler):
    """Episodes whose way and shot are drawn per episode (Meta-Dataset / MedIMeta mm-MAML).

    ``way_range = (low, high)`` (inclusive, ``high=None``: every eligible class) is ignored for
    binary tasks (always both classes); ``shot_range = (low, high)`` inclusive. A class needs
    ``shot_range[1] + n_query`` images (positives, and negatives where they matter) to be used.
    """

    def __init__(
        self,
        source: TaskSource,
        way_range: tuple[int, Optional[int]] = (2, None),
        shot_range: tuple[int, int] = (1, 10),
        n_query: int = 10,
        seed: int = 0,
        on_insufficient: str = "error",
    ) -> None:
        try:
            shot_lo, shot_hi = shot_range
            way_lo, way_hi = way_range
        except (TypeError, ValueError):
            raise ValueError(
                f"way_range / shot_range: expected (low, high) pairs, got {way_range!r} / {shot_range!r}"
            ) from None
        shot_lo = _check_int("shot_range[0]", shot_lo, 1)
        shot_hi = _check_int("shot_range[1]", shot_hi, shot_lo)
        target = source.description.task_target
        way_min = 1 if target is TaskTarget.MULTILABEL_CLASSIFICATION else 2
        way_lo = _check_int("way_range[0]", way_lo, way_min)
        if way_hi is not None:
            way_hi = _check_int("way_range[1]", way_hi, way_lo)
        num_classes = source.description.num_classes
        if target is not TaskTarget.BINARY_CLASSIFICATION and way_lo > num_classes:
            raise ValueError(
                f"way_range={tuple(way_range)} but task {source.description.task_identifier!r} has only "
                f"{num_classes} classes"
            )
        n_query_checked = _check_int("n_query", n_query, 1)
        self.shot_range = (shot_lo, shot_hi)
        super().__init__(
            source,
            n_query_checked,
            seed,
            shot_hi + n_query_checked,
            on_insufficient,
            f"up to {shot_hi} shots + {n_query_checked} query",
        )
        if target is TaskTarget.BINARY_CLASSIFICATION:
            self._require_classes(1, "a binary episode")
            self.way_range = (2, 2)
        else:
            self._require_classes(way_lo, f"way_range low={way_lo}")
            high = len(self.eligible) if way_hi is None else min(way_hi, len(self.eligible))
            self.way_range = (way_lo, high)

    def sample(self, episode_number: int) -> EpisodeSpec:
        rng = episode_rng(self.seed, episode_number)
        way = int(rng.integers(self.way_range[0], self.way_range[1] + 1))
        shots = int(rng.integers(self.shot_range[0], self.shot_range[1] + 1))
        classes = self._choose_classes(rng, way)
        return self._draw(rng, classes, shots, int(episode_number))
