"""The MedIMeta folder layout: file names, split files, label files and the HDF5 image store.

One module knows where each file lives and what it must hold, so the reader, the writer and
the validator agree byte for byte::

    <dataset id>/info.yaml
                 images.hdf5                  dataset "images": uint8 (N,H,W) or (N,H,W,3)
                 images/000000.tiff ...
                 task_labels/<task name>.npy  (N,) raw keys, or (N,K) 0/1 for multi-label
                 splits/{train,val,test}.txt  "images/000123.tiff" lines joined by "\\n"
                 original_splits/{train,val,test}.txt
                 annotations.csv, LICENSE
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from medmeta.data.info import DatasetInfo, TaskInfo
from medmeta.errors import DataFormatError, MissingDataError, UnknownNameError, known_names
from medmeta.tasks import TaskTarget

__all__ = [
    "INFO_FILE",
    "HDF5_FILE",
    "HDF5_DATASET",
    "IMAGE_DIR",
    "LABEL_DIR",
    "ANNOTATIONS_FILE",
    "LICENSE_FILE",
    "ImageStoreShape",
    "image_relpath",
    "tiff_path",
    "label_path",
    "split_dir_name",
    "split_path",
    "format_split_file",
    "parse_split_file",
    "check_task_labels",
    "load_task_labels",
    "resolve_split_indices",
    "inspect_hdf5",
]

INFO_FILE = "info.yaml"
HDF5_FILE = "images.hdf5"
HDF5_DATASET = "images"
IMAGE_DIR = "images"
LABEL_DIR = "task_labels"
ANNOTATIONS_FILE = "annotations.csv"
LICENSE_FILE = "LICENSE"

_SPLIT_LINE = re.compile(r"^(?:.*/)?(\d+)\.tiff?$")

SplitArg = Union[str, Sequence[str], None]


def image_relpath(index: int) -> str:
    """``images/000123.tiff``: the path of image ``index`` relative to the dataset folder."""
    return f"{IMAGE_DIR}/{int(index):06d}.tiff"


def tiff_path(dataset_dir: Path, index: int) -> Path:
    return Path(dataset_dir) / IMAGE_DIR / f"{int(index):06d}.tiff"


def label_path(dataset_dir: Path, task_name: str) -> Path:
    return Path(dataset_dir) / LABEL_DIR / f"{task_name}.npy"


def split_dir_name(original: bool) -> str:
    return "original_splits" if original else "splits"


def split_path(dataset_dir: Path, split: str, original: bool = False) -> Path:
    return Path(dataset_dir) / split_dir_name(original) / f"{split}.txt"


def format_split_file(indices: Iterable[int]) -> str:
    """Split file text: one ``images/NNNNNN.tiff`` per line, ``\\n``-joined, no trailing newline."""
    return "\n".join(image_relpath(i) for i in indices)


def parse_split_file(path: Path, num_images: int) -> np.ndarray:
    """Image indices listed by a split file, in file order (``int64``).

    Every line must name ``images/<index>.tiff`` with ``0 <= index < num_images``, at most once.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: split file not found")
    indices = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        match = _SPLIT_LINE.match(line)
        if match is None:
            raise DataFormatError(f"{path}: line {number}: expected an image path such as 'images/000123.tiff', got {line!r}")
        index = int(match.group(1))
        if index >= num_images:
            raise DataFormatError(
                f"{path}: line {number}: names image {line!r} (index {index}), but the dataset has {num_images} "
                f"images (indices 0..{num_images - 1})"
            )
        indices.append(index)
    out = np.asarray(indices, dtype=np.int64)
    if len(np.unique(out)) != len(out):
        values, counts = np.unique(out, return_counts=True)
        raise DataFormatError(f"{path}: image indices listed more than once: {values[counts > 1][:10].tolist()}")
    return out


def check_task_labels(labels: np.ndarray, info: DatasetInfo, task: TaskInfo, where: str) -> np.ndarray:
    """Validate a label array against its task; returns it (binary ``(N, 1)`` flattened to ``(N,)``).

    Multi-class / ordinal / binary: integer keys ``(N,)`` that are all keys of ``task.labels``.
    Multi-label: ``(N, K)`` of 0/1 with ``K`` the number of labels.
    """
    labels = np.asarray(labels)
    n = info.total_num_samples
    target = task.task_target
    if labels.dtype == object or labels.dtype.kind not in "biuf":
        raise DataFormatError(f"{where}: expected a numeric label array, got dtype {labels.dtype}")
    if labels.ndim == 0 or labels.shape[0] != n:
        got = labels.shape[0] if labels.ndim else "a scalar"
        raise DataFormatError(
            f"{where}: holds {got} labels, expected one per image: total_num_samples = {n} "
            f"(info.yaml of {info.id!r})"
        )
    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        k = task.num_classes
        if labels.ndim != 2 or labels.shape[1] != k:
            raise DataFormatError(
                f"{where}: multi-label task {task.task_name!r} expects shape ({n}, {k}) (one 0/1 column per label), "
                f"got {labels.shape}"
            )
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            raise DataFormatError(
                f"{where}: multi-label values must be 0 or 1, found {np.unique(labels[bad])[:10].tolist()}"
            )
        return labels
    if target.is_classification:
        if target is TaskTarget.BINARY_CLASSIFICATION and labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataFormatError(
                f"{where}: {target.value} task {task.task_name!r} expects shape ({n},) of label keys, got {labels.shape}"
            )
        if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
            raise DataFormatError(f"{where}: label keys must be integers, found non-integer values")
        unknown = np.setdiff1d(np.unique(labels), np.asarray(task.label_keys))
        if len(unknown):
            raise DataFormatError(
                f"{where}: values {unknown[:10].tolist()} are not label keys of task {task.task_name!r} "
                f"(info.yaml labels: {list(task.label_keys)})"
            )
    return labels


def load_task_labels(dataset_dir: Path, info: DatasetInfo, task: TaskInfo) -> np.ndarray:
    """``task_labels/<task name>.npy`` of a task, validated (no pickle is ever loaded)."""
    path = label_path(dataset_dir, task.task_name)
    if not path.is_file():
        raise MissingDataError(f"{path}: label file of task {task.task_name!r} not found")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(f"{path}: not a readable .npy label array ({err})") from None
    return check_task_labels(labels, info, task, str(path))


def _split_names(value: SplitArg, argument: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{argument}: expected a split name or a list of names, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{argument}: a split is named twice in {names}")
    return names


def resolve_split_indices(
    dataset_dir: Path, info: DatasetInfo, split: SplitArg = None, original_split: SplitArg = None
) -> tuple[np.ndarray, str]:
    """Sorted image indices of the named split(s) and a label for reports.

    ``split`` and ``original_split`` take one name or a list (concatenated, sorted by index) and
    exclude each other; neither selects every image. A split that ``info.yaml`` counts as 0 may
    have no file (MedIMeta writes none) and has no samples.
    """
    if split is not None and original_split is not None:
        raise ValueError("split / original_split: give one of them, not both")
    n = info.total_num_samples
    if split is None and original_split is None:
        return np.arange(n, dtype=np.int64), "all"
    original = original_split is not None
    argument = "original_split" if original else "split"
    names = _split_names(original_split if original else split, argument)
    counts = info.split_counts(original)
    if original and info.original_splits_num_samples is None:
        raise UnknownNameError(
            f"{argument}={names}: dataset {info.id!r} has no original splits (no original_splits_num_samples "
            f"in {info.path or 'its info.yaml'})"
        )
    parts = []
    for name in names:
        path = split_path(dataset_dir, name, original)
        if name not in counts and not path.is_file():
            raise UnknownNameError(
                f"{argument}={name!r}: dataset {info.id!r} has no such split; {known_names(name, counts)}"
            )
        expected = counts.get(name)
        if not path.is_file():
            if expected == 0:
                continue
            raise MissingDataError(
                f"{path}: split file not found, but info.yaml {split_dir_name(original)}_num_samples[{name!r}] "
                f"= {expected}"
            )
        indices = parse_split_file(path, n)
        if expected is not None and len(indices) != expected:
            raise DataFormatError(
                f"{path}: lists {len(indices)} images, but info.yaml {split_dir_name(original)}_num_samples"
                f"[{name!r}] = {expected}"
            )
        parts.append(indices)
    merged = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    if len(np.unique(merged)) != len(merged):
        raise DataFormatError(f"{argument}={names}: the splits of dataset {info.id!r} share images")
    label = "+".join(names)
    return merged, (f"original:{label}" if original else label)


@dataclass(frozen=True)
class ImageStoreShape:
    """Shape of the stored images: count, height, width and stored channels (1 or 3)."""

    num_images: int
    height: int
    width: int
    channels: int


def inspect_hdf5(path: Path, expected_images: Optional[int] = None) -> ImageStoreShape:
    """Open ``images.hdf5`` once and check its ``images`` dataset; errors say what was expected."""
    import h5py

    path = Path(path)
    expectation = "an HDF5 file with a uint8 dataset 'images' of shape (N, H, W) or (N, H, W, 3)"
    if not path.is_file():
        raise MissingDataError(f"{path}: image file not found (expected {expectation})")
    try:
        with h5py.File(path, "r") as f:
            if HDF5_DATASET not in f:
                raise DataFormatError(f"{path}: no dataset {HDF5_DATASET!r} (has {sorted(f.keys())}); expected {expectation}")
            ds = f[HDF5_DATASET]
            if not isinstance(ds, h5py.Dataset):
                raise DataFormatError(f"{path}: {HDF5_DATASET!r} is a group, expected {expectation}")
            shape, dtype = tuple(ds.shape), ds.dtype
    except DataFormatError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataFormatError(f"{path}: cannot be read as HDF5 ({err}); expected {expectation}") from None
    if dtype != np.uint8:
        raise DataFormatError(f"{path}: dataset 'images' has dtype {dtype}, expected uint8")
    if len(shape) == 3:
        channels = 1
    elif len(shape) == 4 and shape[3] == 3:
        channels = 3
    else:
        raise DataFormatError(f"{path}: dataset 'images' has shape {shape}, expected (N, H, W) or (N, H, W, 3)")
    if expected_images is not None and shape[0] != expected_images:
        raise DataFormatError(
            f"{path}: dataset 'images' holds {shape[0]} images, but info.yaml total_num_samples = {expected_images}"
        )
    return ImageStoreShape(num_images=shape[0], height=shape[1], width=shape[2], channels=channels)
