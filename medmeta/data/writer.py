"""Write a dataset in the MedIMeta format, from numpy arrays or from an image folder with a CSV.

The result is byte-compatible with the official layout (see :mod:`medmeta.data.layout`) and
readable by :class:`~medmeta.data.medimeta.MedIMetaTaskSource`, :class:`~medmeta.data.MetaDataset`
and the official ``medimeta`` loader::

    <root>/<info id>/info.yaml
                     images.hdf5                  dataset "images": uint8 (N,H,W) or (N,H,W,3)
                     images/000000.tiff ...       only with write_tiffs=True
                     task_labels/<task name>.npy  int64 (N,) raw keys, or (N,K) 0/1 (multi-label)
                     splits/{train,val,test}.txt  (a split without images has no file)
                     original_splits/{train,val,test}.txt
                     annotations.csv              human-readable table (index, splits, class names)
                     LICENSE                      the info's license text, when given

**Info fields the caller gives** (a mapping, or a :class:`~medmeta.data.info.DatasetInfo`):

* ``id`` (folder name; no slashes), ``name`` (the task identifier is ``"<name>: <task name>"``),
  ``domain`` (datasets sharing a domain are grouped, e.g. ``"Dermatoscopy"``);
* ``tasks``: a list of ``{task_name, task_target, labels}``; ``task_target`` is one of
  ``MULTICLASS_CLASSIFICATION``, ``BINARY_CLASSIFICATION`` (exactly 2 labels),
  ``MULTILABEL_CLASSIFICATION`` (keys ``0..K-1``, the label-file columns) or ``ORDINAL_REGRESSION``
  (keys in order of severity, gaps allowed); ``labels`` maps integer key -> class name;
* optional: ``summary``, ``domain_overlaps`` and ``subject_overlaps`` (ids of datasets left out
  of pre-training when this one is the held-out target), ``license`` and any further keys
  (``project_website``, ``original_data``, ...), written back unchanged.

**Derived fields** (filled in; if the caller gives them they must agree, else an error names the
field): ``input_size`` (``[C, H, W]`` of the images), ``total_num_samples``,
``splits_num_samples`` and ``original_splits_num_samples`` (``train``/``val``/``test`` always
present, 0 for a split without images), and ``class_counts`` (an extra key: per task, images per
label key, or positives per column for multi-label; the official loader ignores it).

Everything is validated before anything is written (image shapes and dtype, one label array per
task with one label per image and only known keys, splits that partition the images). The
dataset folder is built in a temporary sibling folder and renamed into place, so a crash never
leaves a half-written dataset under its id.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from medmeta.data.info import SPLIT_NAMES, DatasetInfo, TaskInfo
from medmeta.data.layout import (
    ANNOTATIONS_FILE,
    HDF5_DATASET,
    HDF5_FILE,
    IMAGE_DIR,
    INFO_FILE,
    LABEL_DIR,
    LICENSE_FILE,
    check_task_labels,
    format_split_file,
    image_relpath,
    split_dir_name,
)
from medmeta.data.transforms import ImageTransform, gray_to_rgb, read_image_file
from medmeta.errors import DataFormatError, MissingDataError
from medmeta.tasks import TaskTarget

__all__ = ["write_dataset", "write_dataset_from_folder", "CALLER_INFO_FIELDS", "DERIVED_INFO_FIELDS"]

CALLER_INFO_FIELDS = ("id", "name", "domain", "tasks")
"""Info fields :func:`write_dataset` needs from the caller (see module doc for the optional ones)."""

DERIVED_INFO_FIELDS = (
    "input_size",
    "total_num_samples",
    "splits_num_samples",
    "original_splits_num_samples",
    "class_counts",
)
"""Info fields :func:`write_dataset` computes from the data (given values must agree)."""

ImagesArg = Union[np.ndarray, Sequence[np.ndarray]]
_WHERE = "write_dataset"


# -- validation -------------------------------------------------------------------------------
def _image_geometry(images: ImagesArg) -> tuple[int, tuple[int, ...]]:
    """``(N, per-image shape)`` of the images, checked to be uint8 (H, W) or (H, W, 3)."""
    expectation = "uint8 images of shape (N, H, W) (grayscale) or (N, H, W, 3) (RGB)"
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise DataFormatError(
                f"{_WHERE}: argument 'images': dtype {images.dtype}, expected {expectation}; convert with "
                f"np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1]"
            )
        shape = images.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 3):
            raise DataFormatError(f"{_WHERE}: argument 'images': shape {images.shape}, expected {expectation}")
        return int(shape[0]), tuple(int(s) for s in shape[1:])
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise DataFormatError(f"{_WHERE}: argument 'images': expected a numpy array or a sequence of arrays, got "
                              f"{type(images).__name__}")
    first: Optional[tuple[int, ...]] = None
    for i, img in enumerate(images):
        img = np.asarray(img)
        shape = img.shape[:2] if img.ndim == 3 and img.shape[2] == 1 else img.shape
        if img.dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
            raise DataFormatError(
                f"{_WHERE}: argument 'images[{i}]': {img.dtype} {img.shape}, expected a uint8 (H, W) or (H, W, 3) image"
            )
        if first is None:
            first = tuple(int(s) for s in shape)
        elif tuple(shape) != first:
            raise DataFormatError(
                f"{_WHERE}: argument 'images[{i}]': shape {img.shape} differs from images[0] {first}; every image of "
                f"a dataset has the same size and channels (resize first, or use write_dataset_from_folder with "
                f"image_size)"
            )
    if first is None:
        raise DataFormatError(f"{_WHERE}: argument 'images': no images (a dataset needs at least one)")
    return len(images), first


def _index_lists(splits: Mapping[str, Sequence[int]], n: int, argument: str) -> dict[str, np.ndarray]:
    """Validated split -> sorted int64 indices; the splits must partition ``0..n-1``."""
    if not isinstance(splits, Mapping) or not splits:
        raise DataFormatError(f"{_WHERE}: argument '{argument}': expected a mapping such as "
                              f"{{'train': [...], 'val': [...], 'test': [...]}}, got {splits!r:.80}")
    out: dict[str, np.ndarray] = {}
    owner = np.full(n, -1, dtype=np.int64)
    names = list(splits)
    for s, name in enumerate(names):
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.strip() != name:
            raise DataFormatError(f"{_WHERE}: argument '{argument}': split name {name!r} cannot be a file name")
        raw = np.asarray(list(splits[name]) if not isinstance(splits[name], np.ndarray) else splits[name])
        if raw.size == 0:
            out[name] = np.zeros(0, dtype=np.int64)
            continue
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise DataFormatError(
                f"{_WHERE}: argument '{argument}[{name!r}]': expected a 1-d list of integer image indices, got "
                f"{raw.dtype} {raw.shape}"
            )
        bad = raw[(raw < 0) | (raw >= n)]
        if len(bad):
            raise DataFormatError(
                f"{_WHERE}: argument '{argument}[{name!r}]': names images {bad[:10].tolist()} that do not exist "
                f"(the dataset has {n} images, indices 0..{n - 1})"
            )
        idx = raw.astype(np.int64)
        values, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise DataFormatError(
                f"{_WHERE}: argument '{argument}[{name!r}]': lists images {values[counts > 1][:10].tolist()} "
                f"more than once"
            )
        taken = owner[idx] >= 0
        if taken.any():
            other = names[int(owner[idx[taken][0]])]
            raise DataFormatError(
                f"{_WHERE}: argument '{argument}': images {idx[taken][:10].tolist()} are in both {other!r} and "
                f"{name!r}; splits must not share images"
            )
        owner[idx] = s
        out[name] = np.sort(idx)
    unassigned = np.flatnonzero(owner < 0)
    if len(unassigned):
        raise DataFormatError(
            f"{_WHERE}: argument '{argument}': images {unassigned[:10].tolist()} ({len(unassigned)} in all) are in "
            f"no split; the splits must cover every image (total_num_samples = sum of the split counts)"
        )
    return out


def _split_counts(splits: Mapping[str, np.ndarray]) -> dict[str, int]:
    counts = {name: 0 for name in SPLIT_NAMES}
    counts.update({name: int(len(idx)) for name, idx in splits.items()})
    return counts


def _check_given(given: Mapping[str, Any], key: str, derived: Any, parse: Any = None) -> None:
    """A derived field the caller gave must agree with the data."""
    if key not in given or given[key] is None:
        return
    value = given[key]
    if parse is not None:
        try:
            value = parse(value)
        except (TypeError, ValueError):
            raise DataFormatError(f"{_WHERE}: info field '{key}': cannot be read as {derived!r}, got {value!r}") from None
    if value != derived:
        raise DataFormatError(
            f"{_WHERE}: info field '{key}' = {given[key]!r}, but the data give {derived!r}; leave it out to have it "
            f"filled in"
        )


def _same_counts(value: Any) -> dict[str, int]:
    counts = {str(k): int(str(v).replace("_", "")) for k, v in dict(value).items()}
    return {k: v for k, v in counts.items() if v}  # a split counted 0 is the same as an absent one


def class_counts_of(labels: np.ndarray, task: TaskInfo) -> dict[int, int]:
    """Images per label key (multi-label: positives per column), in key order."""
    if task.task_target is TaskTarget.MULTILABEL_CLASSIFICATION:
        sums = labels.sum(axis=0) if len(labels) else np.zeros(task.num_classes)
        return {k: int(sums[k]) for k in task.label_keys}
    return {k: int(np.count_nonzero(labels == k)) for k in task.label_keys}


def _prepare_info(
    info: "Mapping[str, Any] | DatasetInfo",
    n: int,
    image_shape: tuple[int, ...],
    splits: dict[str, np.ndarray],
    original: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The caller's info with the derived fields filled in (not yet label-checked)."""
    if isinstance(info, DatasetInfo):
        data = info.to_dict()
    elif isinstance(info, Mapping):
        data = dict(info)
    else:
        raise DataFormatError(f"{_WHERE}: argument 'info': expected a mapping of info fields or a DatasetInfo, got "
                              f"{type(info).__name__}")
    missing = [k for k in CALLER_INFO_FIELDS if k not in data or data[k] in (None, "", [])]
    if missing:
        raise DataFormatError(
            f"{_WHERE}: info field(s) {missing} missing; the caller gives {list(CALLER_INFO_FIELDS)} "
            f"(see medmeta.data.writer)"
        )
    for key, default in (("summary", ""), ("domain_overlaps", []), ("subject_overlaps", []), ("license", "")):
        if data.get(key) is None:
            data[key] = default  # every MedIMeta v1.0 info.yaml has these keys
    channels = 1 if len(image_shape) == 2 else 3
    input_size = [channels, image_shape[0], image_shape[1]]
    _check_given(data, "input_size", input_size, lambda v: [int(x) for x in v])
    _check_given(data, "total_num_samples", n, lambda v: int(str(v).replace("_", "")))
    split_counts = _split_counts(splits)
    original_counts = _split_counts(original)
    _check_given(data, "splits_num_samples", _same_counts(split_counts), _same_counts)
    _check_given(data, "original_splits_num_samples", _same_counts(original_counts), _same_counts)
    data["input_size"] = input_size
    data["total_num_samples"] = n
    data["splits_num_samples"] = split_counts
    data["original_splits_num_samples"] = original_counts
    return data


def _ordered(data: Mapping[str, Any]) -> dict[str, Any]:
    """Info keys in MedIMeta's order (known keys first, then the caller's extra keys)."""
    order = (
        "id", "name", "summary", "domain", "tasks", "input_size", "total_num_samples", "splits_num_samples",
        "original_splits_num_samples", "class_counts", "domain_overlaps", "subject_overlaps", "license",
    )
    out = {k: data[k] for k in order if k in data}
    out.update({k: v for k, v in data.items() if k not in out})
    return out


# -- writing ----------------------------------------------------------------------------------
def _iter_images(images: ImagesArg, chunk: int = 256):
    """Yield ``(start, uint8 block)`` of at most ``chunk`` images with the trailing 1-channel axis dropped."""
    if isinstance(images, np.ndarray):
        arr = images[..., 0] if images.ndim == 4 and images.shape[3] == 1 else images
        for start in range(0, len(arr), chunk):
            yield start, np.ascontiguousarray(arr[start:start + chunk])
        return
    for start in range(0, len(images), chunk):
        block = [np.asarray(img) for img in images[start:start + chunk]]
        block = [img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img for img in block]
        yield start, np.stack(block)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def _annotations(n: int, info: DatasetInfo, labels: Mapping[str, np.ndarray],
                 splits: Mapping[str, np.ndarray], original: Mapping[str, np.ndarray]) -> str:
    import csv
    import io

    split_of = np.full(n, "", dtype=object)
    for name, idx in splits.items():
        split_of[idx] = name
    original_of = np.full(n, "", dtype=object)
    for name, idx in original.items():
        original_of[idx] = name
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "image_path", "split", "original_split", *[t.task_name for t in info.tasks]])
    for i in range(n):
        row: list[Any] = [i, image_relpath(i), split_of[i], original_of[i]]
        for task in info.tasks:
            y = labels[task.task_name][i]
            if task.task_target is TaskTarget.MULTILABEL_CLASSIFICATION:
                row.append("|".join(task.labels[k] for k in task.label_keys if y[k]))
            else:
                row.append(task.labels[int(y)])
        writer.writerow(row)
    return buf.getvalue()


def write_dataset(
    root: "str | Path",
    info: "Mapping[str, Any] | DatasetInfo",
    images: ImagesArg,
    task_labels: Mapping[str, np.ndarray],
    splits: Mapping[str, Sequence[int]],
    original_splits: Optional[Mapping[str, Sequence[int]]] = None,
    write_tiffs: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write one dataset to ``root/<info id>/`` in the MedIMeta format; returns that folder.

    Args:
        root: the data root (created if missing); other datasets in it are left alone.
        info: the caller's info fields (see the module doc); derived fields are filled in.
        images: uint8 ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB (``(N, H, W, 1)`` is taken as
            grayscale), or a sequence of such single images of one shape.
        task_labels: task name -> labels, one entry per task of ``info``: raw keys ``(N,)``
            (binary may be ``(N, 1)``) or ``(N, K)`` 0/1 for multi-label.
        splits: split name (``train``/``val``/``test``) -> image indices; they must partition
            ``0..N-1``. ``original_splits`` likewise (default: the same as ``splits``).
        write_tiffs: also write ``images/NNNNNN.tiff`` (the format's alternative image store).
        overwrite: replace an existing ``root/<id>`` folder (else that is an error).
    """
    n, image_shape = _image_geometry(images)
    split_idx = _index_lists(splits, n, "splits")
    original_idx = _index_lists(original_splits if original_splits is not None else splits, n,
                                "original_splits" if original_splits is not None else "splits")
    data = _prepare_info(info, n, image_shape, split_idx, original_idx)
    given_class_counts = data.pop("class_counts", None)
    parsed = DatasetInfo.from_dict(data, where=f"{_WHERE}: info")

    if not isinstance(task_labels, Mapping):
        raise DataFormatError(f"{_WHERE}: argument 'task_labels': expected a mapping of task name -> label array")
    unknown = sorted(set(map(str, task_labels)) - set(parsed.task_names))
    missing = [t for t in parsed.task_names if t not in task_labels]
    if unknown or missing:
        raise DataFormatError(
            f"{_WHERE}: argument 'task_labels': needs exactly one label array per task of info 'tasks' "
            f"{parsed.task_names}; missing {missing}, not in info.tasks {unknown}"
        )
    labels: dict[str, np.ndarray] = {}
    for task in parsed.tasks:
        raw = np.asarray(task_labels[task.task_name])
        if raw.dtype == bool:
            raw = raw.astype(np.int64)
        checked = check_task_labels(raw, parsed, task, f"{_WHERE}: argument 'task_labels[{task.task_name!r}]'")
        labels[task.task_name] = np.ascontiguousarray(checked.astype(np.int64))
    class_counts = {t.task_name: class_counts_of(labels[t.task_name], t) for t in parsed.tasks}
    if given_class_counts is not None:
        try:
            given = {str(t): {int(k): int(v) for k, v in dict(c).items()} for t, c in dict(given_class_counts).items()}
        except (TypeError, ValueError):
            raise DataFormatError(f"{_WHERE}: info field 'class_counts': expected {{task: {{key: count}}}}") from None
        if given != class_counts:
            raise DataFormatError(
                f"{_WHERE}: info field 'class_counts' = {given_class_counts!r} disagrees with the labels "
                f"({class_counts}); leave it out to have it filled in"
            )
    data["class_counts"] = class_counts

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / parsed.id
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: dataset folder exists already (pass overwrite=True to replace it)")

    from medmeta.io import disk_full_error, is_disk_full
    from medmeta.locks import hold

    with hold(root, what=f"dataset {parsed.id!r} of data root", name=f".{parsed.id}.lock"):
        if final.exists() and not overwrite:  # written meanwhile by another process
            raise FileExistsError(f"{final}: dataset folder exists already (pass overwrite=True to replace it)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{parsed.id}.tmp-", dir=root))
        try:
            _write_folder(tmp, data, parsed, images, n, image_shape, labels, split_idx, original_idx, write_tiffs)
            _move_into_place(tmp, final, overwrite)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err):
                kept = "the previous dataset folder is left as it was" if final.exists() else "no folder was left behind"
                raise disk_full_error(final, err, kept=kept) from err
            raise
    return final


def _write_folder(
    folder: Path,
    data: dict[str, Any],
    info: DatasetInfo,
    images: ImagesArg,
    n: int,
    image_shape: tuple[int, ...],
    labels: Mapping[str, np.ndarray],
    splits: Mapping[str, np.ndarray],
    original: Mapping[str, np.ndarray],
    write_tiffs: bool,
) -> None:
    import h5py
    import yaml

    with h5py.File(folder / HDF5_FILE, "w") as f:
        # contiguous and unfiltered, like MedIMeta: readers memory-map it; chunked or gzip files read
        # 10-30x slower in random batches (benchmarks/bench_data_reads.py, HDF5 layout table)
        ds = f.create_dataset(HDF5_DATASET, shape=(n, *image_shape), dtype=np.uint8)
        for start, block in _iter_images(images):
            ds[start:start + len(block)] = block
    if write_tiffs:
        from PIL import Image

        (folder / IMAGE_DIR).mkdir()
        for start, block in _iter_images(images):
            for j, img in enumerate(block):
                Image.fromarray(img).save(folder / image_relpath(start + j), format="TIFF")
    (folder / LABEL_DIR).mkdir()
    for task in info.tasks:
        with open(folder / LABEL_DIR / f"{task.task_name}.npy", "wb") as fh:
            np.save(fh, labels[task.task_name], allow_pickle=False)
    for original_flag, parts in ((False, splits), (True, original)):
        sub = folder / split_dir_name(original_flag)
        sub.mkdir()
        for name, idx in parts.items():
            if len(idx):  # MedIMeta writes no file for an empty split
                _write_text(sub / f"{name}.txt", format_split_file(idx))
    _write_text(folder / ANNOTATIONS_FILE, _annotations(n, info, labels, splits, original))
    if info.license:
        _write_text(folder / LICENSE_FILE, info.license + "\n")
    _write_text(folder / INFO_FILE, yaml.safe_dump(_ordered(data), sort_keys=False, allow_unicode=True, width=100, default_flow_style=None))
    os.chmod(folder, 0o755)  # mkdtemp makes it private


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``final`` (an existing one is swapped out, then deleted)."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final}: dataset folder exists already (pass overwrite=True to replace it)")
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)


# -- from an image folder ---------------------------------------------------------------------
def _task_column_map(info: DatasetInfo, task_columns: Any, csv_columns: Sequence[str], csv_path: Path) -> dict[str, Any]:
    if task_columns is None:
        mapping: dict[str, Any] = {t.task_name: t.task_name for t in info.tasks}
    elif isinstance(task_columns, Mapping):
        mapping = dict(task_columns)
        unknown = sorted(set(mapping) - set(info.task_names))
        if unknown:
            raise DataFormatError(f"task_columns: tasks {unknown} are not in info 'tasks' {info.task_names}")
        for t in info.task_names:
            mapping.setdefault(t, t)
    else:
        raise DataFormatError("task_columns: expected None or a mapping of task name -> CSV column (or list of "
                              "0/1 columns for a multi-label task)")
    for task, cols in mapping.items():
        for col in [cols] if isinstance(cols, str) else list(cols):
            if col not in csv_columns:
                raise DataFormatError(
                    f"{csv_path}: no column {col!r} (labels of task {task!r}); the CSV has columns {list(csv_columns)}"
                )
    return mapping


def _parse_labels(task: TaskInfo, values: Any, csv_path: Path, columns: Any) -> np.ndarray:
    """CSV cells -> raw label array; a cell holds a key or a class name (multi-label: names or keys
    joined by ``|``, or one 0/1 column per label)."""
    by_name = {name: key for key, name in task.labels.items()}

    def key_of(cell: Any, row: int) -> int:
        text = str(cell).strip()
        if text in by_name:
            return by_name[text]
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and number == int(number) and int(number) in task.labels:
            return int(number)
        raise DataFormatError(
            f"{csv_path}: row {row + 2}, column {columns!r}: {cell!r} is neither a label key nor a class name of task "
            f"{task.task_name!r} (keys {list(task.label_keys)}, names {list(task.classes)})"
        )

    if task.task_target is TaskTarget.MULTILABEL_CLASSIFICATION:
        if not isinstance(columns, str):
            return np.asarray(values, dtype=np.float64).round().astype(np.int64)
        out = np.zeros((len(values), task.num_classes), dtype=np.int64)
        for row, cell in enumerate(values):
            if cell is None or (isinstance(cell, float) and np.isnan(cell)) or str(cell).strip() == "":
                continue
            for part in str(cell).split("|"):
                out[row, key_of(part, row)] = 1
        return out
    return np.asarray([key_of(cell, row) for row, cell in enumerate(values)], dtype=np.int64)


def write_dataset_from_folder(
    root: "str | Path",
    info: "Mapping[str, Any] | DatasetInfo",
    image_dir: "str | Path",
    labels_csv: "str | Path",
    image_column: str = "filename",
    task_columns: Optional[Mapping[str, Any]] = None,
    split_column: Optional[str] = "split",
    image_size: "int | tuple[int, int] | None" = None,
    original_split_column: Optional[str] = None,
    channels: Optional[int] = None,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    write_tiffs: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert a folder of images with a CSV of labels to the MedIMeta format (one row per image).

    Args:
        image_dir: folder the ``image_column`` paths are relative to (any format PIL reads).
        labels_csv: the table; ``task_columns`` maps task name -> column (default: a column
            named like the task). A cell holds a label key or a class name; a multi-label task
            takes names/keys joined by ``|`` (empty: none), or a list of 0/1 columns in key order.
        split_column: column with ``train``/``val``/``test``; ``None``: a seeded random split
            with ``split_fractions``. ``original_split_column`` likewise (default: the same split).
        image_size: resize every image to this (int or ``(H, W)``, PIL bilinear); ``None``
            requires all images to have one size.
        channels: 1 (grayscale) or 3 (RGB); default ``info["input_size"][0]`` when given, else
            the first image's mode (``L`` -> 1, anything else -> 3).
    """
    import pandas as pd

    csv_path = Path(labels_csv).expanduser()
    image_dir = Path(image_dir).expanduser()
    if not csv_path.is_file():
        raise MissingDataError(f"{csv_path}: labels CSV not found (argument 'labels_csv')")
    if not image_dir.is_dir():
        raise MissingDataError(f"{image_dir}: image folder not found (argument 'image_dir')")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if len(table) == 0:
        raise DataFormatError(f"{csv_path}: no rows (one row per image expected)")
    if image_column not in table.columns:
        raise DataFormatError(f"{csv_path}: no column {image_column!r} (argument 'image_column'); the CSV has "
                              f"columns {list(table.columns)}")

    info_data = info.to_dict() if isinstance(info, DatasetInfo) else dict(info)
    if "tasks" not in info_data:
        raise DataFormatError(f"{_WHERE}: info field 'tasks' missing; the caller gives {list(CALLER_INFO_FIELDS)}")
    # parse the tasks on their own first (the counts are not known yet)
    tasks = tuple(TaskInfo.from_dict(t, f"{_WHERE}: info", f"tasks[{i}]") for i, t in enumerate(info_data["tasks"]))
    probe = DatasetInfo(id=str(info_data.get("id", "?")), name=str(info_data.get("name", "?")), domain="?",
                        tasks=tasks, input_size=(1, 1, 1), total_num_samples=len(table),
                        splits_num_samples={"train": len(table)})
    mapping = _task_column_map(probe, task_columns, list(table.columns), csv_path)
    task_labels = {}
    for task in tasks:
        cols = mapping[task.task_name]
        values = table[cols].to_numpy() if not isinstance(cols, str) else table[cols].tolist()
        if not isinstance(cols, str):
            try:
                values = values.astype(np.float64)
            except ValueError:
                raise DataFormatError(f"{csv_path}: columns {list(cols)} of multi-label task {task.task_name!r} "
                                      f"must hold 0/1") from None
        task_labels[task.task_name] = _parse_labels(task, values, csv_path, cols)

    def split_lists(column: Optional[str], argument: str) -> dict[str, list[int]]:
        if column is None:
            fractions = np.asarray(split_fractions, dtype=np.float64)
            if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
                raise DataFormatError(f"split_fractions: expected three non-negative numbers, got {split_fractions!r}")
            order = np.random.default_rng(seed).permutation(len(table))
            cuts = np.round(np.cumsum(fractions / fractions.sum()) * len(table)).astype(int)
            parts = np.split(order, cuts[:2])
            return {name: sorted(p.tolist()) for name, p in zip(SPLIT_NAMES, parts)}
        if column not in table.columns:
            raise DataFormatError(f"{csv_path}: no column {column!r} (argument '{argument}'); the CSV has columns "
                                  f"{list(table.columns)}; pass {argument}=None for a random split")
        out: dict[str, list[int]] = {}
        for row, value in enumerate(table[column].tolist()):
            name = str(value).strip()
            if name not in SPLIT_NAMES:
                raise DataFormatError(f"{csv_path}: row {row + 2}, column {column!r}: split {value!r}, expected one of "
                                      f"{list(SPLIT_NAMES)}")
            out.setdefault(name, []).append(row)
        return out

    splits = split_lists(split_column, "split_column")
    original = split_lists(original_split_column, "original_split_column") if original_split_column else None

    size: Optional[tuple[int, int]] = None
    if image_size is not None:
        size = (int(image_size), int(image_size)) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if min(size) < 1:
            raise DataFormatError(f"image_size: expected positive sizes, got {image_size!r}")
    if channels is None and info_data.get("input_size"):
        channels = int(list(info_data["input_size"])[0])
    from medmeta.io import contained_path

    paths = [contained_path(image_dir, p, f"{csv_path}: row {row + 2}, column {image_column!r}")
             for row, p in enumerate(table[image_column].tolist())]
    if channels is None:
        from PIL import Image

        try:
            with Image.open(paths[0]) as first:
                channels = 1 if first.mode in ("L", "1", "I;16", "I", "F") else 3
        except FileNotFoundError:
            raise MissingDataError(f"{csv_path}: row 2, column {image_column!r}: image file {paths[0]} not found") from None
    if channels not in (1, 3):
        raise DataFormatError(f"channels: expected 1 or 3, got {channels!r}")
    stored = ImageTransform(channels, size, normalize=None)
    images: list[np.ndarray] = []
    for row, path in enumerate(paths):
        img = stored.image(read_image_file(path, channels, f"{csv_path}: row {row + 2}, column {image_column!r}"))
        if channels == 3 and img.ndim == 2:
            img = gray_to_rgb(img)
        if images and img.shape != images[0].shape:
            raise DataFormatError(
                f"{csv_path}: row {row + 2}: image {path} has size {img.shape[:2]}, the first image {images[0].shape[:2]}; "
                f"pass image_size to resize all images"
            )
        images.append(img)
    return write_dataset(root, info_data, np.stack(images), task_labels, splits, original, write_tiffs=write_tiffs,
                         overwrite=overwrite)
