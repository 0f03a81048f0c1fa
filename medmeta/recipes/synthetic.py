"""A seeded synthetic meta-dataset in the MedIMeta format: the tests' and examples' default data.

Six small datasets in five domains, grayscale and RGB, with every classification task kind:
multi-class, binary, multi-label (several findings per image) and ordinal with gaps in its keys
(``0, 2, 5, 9``, like DeepDRiD's ``1, 4, 6, 8, 10``). Two datasets share a domain and list each
other in ``domain_overlaps`` / ``subject_overlaps``, so hold-out logic has something to drop.

Images are learnable: each label adds a fixed smooth random pattern (per task and class,
per channel for RGB) to a dataset-specific background, plus pixel noise:

* multi-class: the pattern of its class; binary: + or - one pattern;
* ordinal: one pattern scaled by the rank of the key (0 .. 1), so classes are ordered;
* multi-label: the sum of the patterns of the positive labels.

The patterns are low-frequency, so they survive resizing. Per-image smooth nuisance patterns
(unrelated to the labels) and pixel noise keep the tasks from being trivial: with the defaults a
nearest-centroid classifier on raw pixels beats chance on every task, clearly but not perfectly
in 1-shot episodes.
Everything derives from ``seed``; the files are written with :func:`~medmeta.data.writer.write_dataset`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from medmeta.data.writer import write_dataset
from medmeta.errors import ConfigError, UnknownNameError, known_names
from medmeta.tasks import TaskTarget

__all__ = ["SYNTHETIC_DATASETS", "SyntheticTask", "SyntheticDataset", "build_synthetic_meta_dataset"]


@dataclass(frozen=True)
class SyntheticTask:
    task_name: str
    target: TaskTarget
    labels: tuple[tuple[int, str], ...]  # (key, class name), keys in order
    positive_rate: float = 0.3  # multi-label: chance of each label

    @property
    def keys(self) -> list[int]:
        return [k for k, _ in self.labels]


@dataclass(frozen=True)
class SyntheticDataset:
    id: str
    name: str
    domain: str
    channels: int
    tasks: tuple[SyntheticTask, ...]
    domain_overlaps: tuple[str, ...] = ()
    subject_overlaps: tuple[str, ...] = ()


def _names(prefix: str, keys: list[int]) -> tuple[tuple[int, str], ...]:
    return tuple((k, f"{prefix} {k}") for k in keys)


_MC, _BIN, _ML, _ORD = (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.BINARY_CLASSIFICATION,
                        TaskTarget.MULTILABEL_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION)

SYNTHETIC_DATASETS: tuple[SyntheticDataset, ...] = (
    SyntheticDataset(
        "syn_derm", "Synthetic Dermatoscopy", "Synthetic dermatoscopy", 3,
        (SyntheticTask("lesion type", _MC, (
            (0, "nevus"), (1, "melanoma"), (2, "keratosis"), (3, "basal cell carcinoma"))),
         SyntheticTask("malignant", _BIN, ((0, "benign"), (1, "malignant")))),
        domain_overlaps=("syn_derm_clinic",), subject_overlaps=("syn_derm_clinic",),
    ),
    SyntheticDataset(
        "syn_derm_clinic", "Synthetic Skin Lesion Photos", "Synthetic dermatoscopy", 3,
        (SyntheticTask("lesion type", _MC, ((0, "nevus"), (1, "melanoma"), (2, "keratosis"))),),
        domain_overlaps=("syn_derm",), subject_overlaps=("syn_derm",),
    ),
    SyntheticDataset(
        "syn_fundus", "Synthetic Fundus", "Synthetic fundus", 3,
        (SyntheticTask("retinopathy grade", _ORD, _names("grade", [0, 2, 5, 9])),
         SyntheticTask("image quality", _BIN, ((0, "not gradable"), (1, "gradable")))),
    ),
    SyntheticDataset(
        "syn_xray", "Synthetic Chest X-ray", "Synthetic chest X-ray", 1,
        (SyntheticTask("findings", _ML, ((0, "effusion"), (1, "nodule"), (2, "cardiomegaly"), (3, "pneumothorax"))),
         SyntheticTask("patient sex", _BIN, ((0, "F"), (1, "M")))),
    ),
    SyntheticDataset(
        "syn_oct", "Synthetic OCT", "Synthetic OCT", 1,
        (SyntheticTask("condition", _MC, ((0, "normal"), (1, "drusen"), (2, "edema"), (3, "neovascularisation"),
                                          (4, "atrophy"))),
         SyntheticTask("severity", _ORD, _names("level", [1, 2, 3]))),
    ),
    SyntheticDataset(
        "syn_path", "Synthetic Histopathology", "Synthetic histopathology", 3,
        (SyntheticTask("tissue", _MC, ((0, "tumour"), (1, "stroma"), (2, "lymphocytes"), (3, "mucus"),
                                       (4, "adipose"), (5, "debris"))),),
    ),
)
"""The datasets :func:`build_synthetic_meta_dataset` writes (ids, domains, tasks)."""


def _interpolation_matrix(size: int, grid: int) -> np.ndarray:
    """``(size, grid)`` linear-interpolation weights from a coarse grid to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * grid - 0.5
    pos = np.clip(pos, 0, grid - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, grid - 1)
    frac = pos - lo
    m = np.zeros((size, grid))
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m


def _patterns(rng: np.random.Generator, count: int, channels: int, size: int, grid: int = 5) -> np.ndarray:
    """``count`` smooth random patterns ``(count, size, size, channels)`` with unit std."""
    m = _interpolation_matrix(size, grid)
    coarse = rng.normal(0.0, 1.0, (count, channels, grid, grid))
    fine = np.einsum("ig,kcgh,jh->kijc", m, coarse, m)
    fine -= fine.mean(axis=(1, 2, 3), keepdims=True)
    fine /= fine.std(axis=(1, 2, 3), keepdims=True) + 1e-8
    return fine


def _labels_of(task: SyntheticTask, n: int, rng: np.random.Generator) -> np.ndarray:
    keys = np.asarray(task.keys)
    if task.target is TaskTarget.MULTILABEL_CLASSIFICATION:
        return (rng.random((n, len(keys))) < task.positive_rate).astype(np.int64)
    # every class appears about equally often (a shuffled cycle), so every split has every class
    cycle = np.resize(keys, n)
    return rng.permutation(cycle).astype(np.int64)


def _signal(task: SyntheticTask, labels: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Per-image signal ``(n, H, W, C)`` of one task (see module doc)."""
    keys = task.keys
    if task.target is TaskTarget.MULTILABEL_CLASSIFICATION:
        return np.einsum("nk,khwc->nhwc", labels.astype(np.float64), patterns[: len(keys)])
    rank = np.searchsorted(np.asarray(keys), labels)
    if task.target is TaskTarget.ORDINAL_REGRESSION:
        scale = rank / max(len(keys) - 1, 1) * 2.0 - 1.0
        return scale[:, None, None, None] * patterns[0][None] * 1.5
    if task.target is TaskTarget.BINARY_CLASSIFICATION:
        return (rank * 2.0 - 1.0)[:, None, None, None] * patterns[0][None]
    return patterns[rank]


def _split(strata: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator) -> dict[str, list[int]]:
    """Train / val / test indices, stratified by ``strata`` (each class split by ``fractions``)."""
    cum = np.cumsum(np.asarray(fractions) / sum(fractions))
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        cuts = np.round(cum * len(members)).astype(int)
        for name, chunk in zip(parts, np.split(members, cuts[:2])):
            parts[name].extend(chunk.tolist())
    return {name: sorted(idx) for name, idx in parts.items()}


def build_synthetic_meta_dataset(
    root: "str | Path",
    seed: int = 0,
    image_size: int = 32,
    num_images: Union[int, Mapping[str, int]] = 240,
    noise: float = 2.0,
    nuisance_scale: float = 0.5,
    dataset_ids: Optional[list[str]] = None,
    write_tiffs: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic meta-dataset (see module doc) under ``root``; returns ``root``.

    Args:
        seed: everything (patterns, labels, noise, splits) derives from it.
        image_size: square image side in pixels.
        num_images: images per dataset, or a mapping dataset id -> count.
        noise: pixel noise std relative to the class patterns (unit std).
        nuisance_scale: std of the weights of 8 label-independent smooth patterns added per image
            (higher: harder tasks; pixel noise matters less, as it averages out).
        dataset_ids: write only these of :data:`SYNTHETIC_DATASETS` (default all).
        write_tiffs / overwrite: passed to :func:`~medmeta.data.writer.write_dataset`.
    """
    if int(image_size) < 4:
        raise ConfigError(f"image_size: expected at least 4 pixels, got {image_size!r}")
    image_size = int(image_size)
    known = [d.id for d in SYNTHETIC_DATASETS]
    if dataset_ids is not None:
        unknown = sorted(set(dataset_ids) - set(known))
        if unknown:
            raise UnknownNameError(f"dataset_ids: unknown synthetic datasets {unknown}; {known_names(unknown[0], known)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for index, spec in enumerate(SYNTHETIC_DATASETS):
        if dataset_ids is not None and spec.id not in dataset_ids:
            continue
        n = int(num_images[spec.id]) if isinstance(num_images, Mapping) else int(num_images)
        if n < 10:
            raise ConfigError(f"num_images: a synthetic dataset needs at least 10 images, got {n} for {spec.id!r}")
        rng = np.random.default_rng([int(seed), index])
        background = _patterns(rng, 1, spec.channels, image_size)[0] * 0.5
        tint = rng.uniform(-0.5, 0.5, spec.channels)
        signal = np.zeros((n, image_size, image_size, spec.channels))
        task_labels = {}
        for task in spec.tasks:
            labels = _labels_of(task, n, rng)
            patterns = _patterns(rng, len(task.keys), spec.channels, image_size)
            signal += _signal(task, labels, patterns)
            task_labels[task.task_name] = labels
        # per-image smooth nuisance (anatomy, lighting) unrelated to the labels, then pixel noise
        nuisance = np.einsum("nk,khwc->nhwc", rng.normal(0.0, nuisance_scale, (n, 8)), _patterns(rng, 8, spec.channels, image_size))
        pixels = background[None] + tint + signal + nuisance + rng.normal(0.0, noise, signal.shape)
        images = np.clip(np.round(128.0 + 20.0 * pixels), 0, 255).astype(np.uint8)
        if spec.channels == 1:
            images = images[..., 0]
        # stratified by the first single-label task, so every split holds each of its classes
        single = [t for t in spec.tasks if t.target is not TaskTarget.MULTILABEL_CLASSIFICATION]
        strata = task_labels[single[0].task_name] if single else np.zeros(n, dtype=np.int64)
        splits = _split(strata, (0.6, 0.2, 0.2), rng)
        # the "original" partition differs, with no validation images (as in several MedIMeta datasets)
        original = _split(strata, (0.8, 0.0, 0.2), rng)
        info = {
            "id": spec.id,
            "name": spec.name,
            "summary": (
                # "medmeta.data.synthetic" is this module's former name, kept so that the written
                # files (and the embedded cache, SYNTHETIC_VERSION) stay byte for byte the same
                f"Synthetic {'grayscale' if spec.channels == 1 else 'RGB'} images (seed {seed}) generated by "
                f"medmeta.data.synthetic: each label adds a fixed smooth random pattern to a background, plus "
                f"Gaussian pixel noise (std {noise} relative to the patterns). Not medical data."
            ),
            "domain": spec.domain,
            "tasks": [
                {"task_name": t.task_name, "task_target": t.target.value, "labels": dict(t.labels)} for t in spec.tasks
            ],
            "domain_overlaps": list(spec.domain_overlaps),
            "subject_overlaps": list(spec.subject_overlaps),
            "license": "CC0 1.0 (generated data)",
            "label_source": "Labels are drawn at random; the image of each sample is generated from its labels.",
        }
        write_dataset(root, info, images, task_labels, splits, original, write_tiffs=write_tiffs, overwrite=overwrite)
    return root
