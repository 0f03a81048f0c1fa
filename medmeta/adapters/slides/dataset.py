"""Slides with slide-level labels as a task source whose items are bags of cached tile features.

``SlideTaskSource`` reads a label table (CSV or DataFrame: a filename column, a label column,
optional metadata columns), tiles and embeds every slide once (:func:`slide_features`, cached
per slide) and then serves bags ``(N_i, D)`` from the cache. It follows the
:class:`~medmeta.data.source.TaskSource` contract (``description``, raw ``labels``,
``image_indices``, ``read_images``), with :class:`~medmeta.adapters.slides.mil.Bags` in place of
image tensors, so slide-level few-shot episodes (K labelled slides per class) and MIL training
run on cached features. A ``domain_column`` (VisioMel's ``resolution``: the scanning centre)
gives a natural domain split.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from medmeta.adapters.slides.errors import SlideError, SlideOpenError
from medmeta.adapters.slides.features import SlideFeatures, SlideFeatureStore, slide_features
from medmeta.adapters.slides.mil import Bags
from medmeta.data.source import TaskSource
from medmeta.tasks import Episode, TaskDescription, TaskTarget

__all__ = ["SlideTaskSource", "read_label_table", "sample_slide_episodes", "encode_episode_labels"]

log = logging.getLogger(__name__)


def read_label_table(table: "pd.DataFrame | str | Path", required: Sequence[str], where: str = "") -> pd.DataFrame:
    """A label/metadata table with its ``required`` columns checked (errors name file and column)."""
    name = where or (str(table) if not isinstance(table, pd.DataFrame) else "table")
    if isinstance(table, pd.DataFrame):
        df = table.copy()
    else:
        path = Path(table)
        if not path.is_file():
            raise FileNotFoundError(f"label table {path} does not exist")
        df = pd.read_csv(path, dtype={c: str for c in ("filename",)}, keep_default_na=True)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: column(s) {missing} missing; the table has columns {list(df.columns)}")
    return df


class SlideTaskSource(TaskSource):
    """A slide-level task over cached bags of tile features.

    Args:
        table: CSV path or DataFrame with ``filename_column`` and ``label_column``.
        slide_dir: folder holding the slide files named in the table.
        backbone: the tile embedding model (e.g. ``create_backbone("resnet18", pretrained=...)``).
        cache: folder (or :class:`SlideFeatureStore`) for the per-slide feature files.
        tiling: keyword arguments of :func:`~medmeta.adapters.slides.tiling.tile_slide`.
        classes: label values in class order (default: sorted unique values); a binary task's
            positive class is the second.
        metadata_columns: columns kept in ``metadata`` (checked to exist).
        domain_column: column whose values name each slide's domain.
        max_tiles: sample at most this many tiles per slide (seeded), bounding time and memory.
        on_error: ``"raise"`` or ``"skip"`` (a slide that fails is left out and recorded in
            ``failures`` with its reason).
    """

    def __init__(
        self,
        table: "pd.DataFrame | str | Path",
        slide_dir: "str | Path",
        label_column: str,
        backbone: nn.Module,
        cache: "SlideFeatureStore | str | Path",
        tiling: Optional[dict[str, Any]] = None,
        filename_column: str = "filename",
        classes: Optional[Sequence[Any]] = None,
        task_target: "TaskTarget | str | None" = None,
        metadata_columns: Sequence[str] = (),
        domain_column: Optional[str] = None,
        max_tiles: Optional[int] = None,
        seed: int = 0,
        dataset_id: str = "slides",
        task_name: Optional[str] = None,
        split: str = "",
        on_error: str = "raise",
        batch_size: int = 64,
        num_workers: int = 0,
        device: "str | torch.device | None" = None,
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        transform_id: Optional[str] = None,
        backend: str = "auto",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        required = [filename_column, label_column, *metadata_columns]
        if domain_column:
            required.append(domain_column)
        df = read_label_table(table, required)
        if df[label_column].isna().any():
            rows = df.index[df[label_column].isna()].tolist()[:10]
            raise ValueError(f"label table: column {label_column!r} is empty in rows {rows}")
        slide_dir = Path(slide_dir)
        cache = SlideFeatureStore(cache) if isinstance(cache, (str, Path)) else cache
        self.failures: dict[str, str] = {}
        features: list[SlideFeatures] = []
        keep: list[int] = []
        for row, name in enumerate(df[filename_column].astype(str)):
            path = slide_dir / name
            try:
                if not path.is_file():
                    raise SlideOpenError(f"slide {path}: listed in the label table but the file does not exist")
                feats = slide_features(
                    path, backbone, cache, tiling=tiling, max_tiles=max_tiles, seed=seed,
                    transform=transform, transform_id=transform_id, batch_size=batch_size,
                    num_workers=num_workers, device=device, backend=backend,
                )
            except SlideError as err:
                if on_error == "raise":
                    raise
                self.failures[name] = str(err)
                log.warning("slide %d/%d left out: %s", row + 1, len(df), type(err).__name__)
                continue
            if feats.path is not None:  # serve bags from the cache file, not memory
                feats.features = None
            features.append(feats)
            keep.append(row)
        kept = df.iloc[keep].reset_index(drop=True)
        self._init_items(
            features=features,
            raw_labels=kept[label_column].to_numpy(),
            classes=classes if classes is not None else sorted(pd.unique(df[label_column]).tolist()),
            task_target=task_target,
            task_identifier=f"{dataset_id}: {task_name or label_column}",
            dataset_id=dataset_id,
            task_name=task_name or label_column,
            image_indices=np.asarray(keep, dtype=np.int64),
            split=split,
        )
        self.filenames = kept[filename_column].astype(str).tolist()
        self.metadata = kept[list(metadata_columns)].copy() if metadata_columns else pd.DataFrame(index=kept.index)
        self.domains = kept[domain_column].to_numpy() if domain_column else None

    @classmethod
    def from_features(
        cls,
        features: Sequence["SlideFeatures | np.ndarray | Tensor"],
        labels: Sequence[Any],
        classes: Optional[Sequence[Any]] = None,
        task_target: "TaskTarget | str | None" = None,
        dataset_id: str = "slides",
        task_name: str = "label",
        filenames: Optional[Sequence[str]] = None,
        domains: Optional[Sequence[Any]] = None,
        split: str = "",
    ) -> "SlideTaskSource":
        """A source over bags already in memory or in feature files (no slides needed)."""
        self = cls.__new__(cls)
        raw = np.asarray(labels)
        self.failures = {}
        self._init_items(
            features=list(features),
            raw_labels=raw,
            classes=classes if classes is not None else sorted(pd.unique(raw).tolist()),
            task_target=task_target,
            task_identifier=f"{dataset_id}: {task_name}",
            dataset_id=dataset_id,
            task_name=task_name,
            image_indices=np.arange(len(labels), dtype=np.int64),
            split=split,
        )
        self.filenames = list(filenames) if filenames is not None else [f"bag_{i}" for i in range(len(labels))]
        self.metadata = pd.DataFrame(index=range(len(labels)))
        self.domains = None if domains is None else np.asarray(domains)
        return self

    def _init_items(
        self,
        features: list[Any],
        raw_labels: np.ndarray,
        classes: Sequence[Any],
        task_target: "TaskTarget | str | None",
        task_identifier: str,
        dataset_id: str,
        task_name: str,
        image_indices: np.ndarray,
        split: str,
    ) -> None:
        if len(features) != len(raw_labels):
            raise ValueError(f"{task_identifier}: {len(features)} bags for {len(raw_labels)} labels")
        classes = list(classes)
        lookup = {str(c): k for k, c in enumerate(classes)}
        unknown = sorted({str(v) for v in raw_labels} - set(lookup))
        if unknown:
            raise ValueError(f"{task_identifier}: label values {unknown[:10]} are not among classes {classes}")
        if task_target is None:
            task_target = TaskTarget.BINARY_CLASSIFICATION if len(classes) == 2 else TaskTarget.MULTICLASS_CLASSIFICATION
        self.description = TaskDescription(
            task_target=TaskTarget.parse(task_target),
            classes=tuple(str(c) for c in classes),
            task_identifier=task_identifier,
            domain_identifier=dataset_id,
            dataset_id=dataset_id,
            task_name=task_name,
        )
        self.labels = np.asarray([lookup[str(v)] for v in raw_labels], dtype=np.int64)
        self.image_indices = image_indices
        self.split = split
        self._features = features

    # ---- items -----------------------------------------------------------------------------
    def bag(self, position: int) -> Tensor:
        """Features ``(N, D)`` of the slide at ``position`` (read from its cache file)."""
        item = self._features[int(position)]
        if isinstance(item, SlideFeatures):
            return item.tensor()
        return torch.as_tensor(item, dtype=torch.float32)

    def read_bags(self, positions: Sequence[int]) -> list[Tensor]:
        return [self.bag(p) for p in positions]

    def read_images(self, positions: Sequence[int]) -> Bags:  # type: ignore[override]
        """The bags at ``positions`` (the slide-level stand-in for an image batch)."""
        return Bags(self.read_bags(positions))

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.bag(position), torch.as_tensor(self.labels[position])

    def episode_labels(self, positions: Sequence[int]) -> Tensor:
        return encode_episode_labels(self.labels[np.asarray(positions, dtype=np.int64)], self.description)

    def subset(self, positions: Sequence[int], split: Optional[str] = None) -> "SlideTaskSource":
        """The slides at ``positions`` (e.g. one domain), sharing the cache."""
        pos = np.asarray(positions, dtype=np.int64)
        out = self.__class__.__new__(self.__class__)
        out.__dict__.update(self.__dict__)
        out._features = [self._features[int(p)] for p in pos]
        out.labels = self.labels[pos]
        out.image_indices = self.image_indices[pos]
        out.filenames = [self.filenames[int(p)] for p in pos]
        out.metadata = self.metadata.iloc[pos].reset_index(drop=True)
        out.domains = None if self.domains is None else self.domains[pos]
        out.split = self.split if split is None else split
        return out


def encode_episode_labels(keys: np.ndarray, description: TaskDescription) -> Tensor:
    """Class positions to the episode encoding: binary ``(N, 1)`` float, else ``(N,)`` int64."""
    positions = torch.as_tensor(np.asarray(keys, dtype=np.int64))
    if description.task_target is TaskTarget.BINARY_CLASSIFICATION:
        return positions.float().reshape(-1, 1)
    if description.task_target.uses_sigmoid:
        raise ValueError(f"{description.task_identifier}: multi-label slide tasks are not supported")
    return positions


def sample_slide_episodes(
    source: SlideTaskSource,
    k_shot: int,
    n_query: int,
    n_episodes: int = 1,
    seed: int = 0,
) -> list[Episode]:
    """Slide-level episodes: ``k_shot`` support and ``n_query`` query slides of every class.

    Seeded and replayable (each episode records the slides' ``image_indices``).
    """
    if k_shot < 1 or n_query < 1:
        raise ValueError(f"sample_slide_episodes: k_shot and n_query must be >= 1, got {k_shot}, {n_query}")
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(source.labels == c) for c in range(source.description.num_classes)}
    for c, idx in by_class.items():
        if len(idx) < k_shot + n_query:
            raise ValueError(
                f"{source.description.task_identifier}: class {source.description.classes[c]!r} has "
                f"{len(idx)} slides; an episode needs k_shot + n_query = {k_shot + n_query}"
            )
    episodes = []
    for e in range(n_episodes):
        support, query = [], []
        for c in range(source.description.num_classes):
            pick = rng.permutation(by_class[c])[: k_shot + n_query]
            support.extend(pick[:k_shot].tolist())
            query.extend(pick[k_shot:].tolist())
        episodes.append(
            Episode(
                support_images=source.read_images(support),
                support_labels=source.episode_labels(support),
                query_images=source.read_images(query),
                query_labels=source.episode_labels(query),
                description=source.description,
                support_indices=source.image_indices[support],
                query_indices=source.image_indices[query],
                info={"k_shot": k_shot, "n_query": n_query, "episode": e, "seed": seed,
                      "task": source.description.task_identifier, "split": source.split},
            )
        )
    return episodes
