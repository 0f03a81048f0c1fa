"""MedIMetaTaskSource: one task of one MedIMeta-format dataset, byte-compatible with the official
loader (``medimeta`` 0.0.6, Woerner et al., "A comprehensive and easy-to-use multi-domain
multi-task medical imaging meta-dataset", 2024).

An item equals what the official ``MedIMeta`` dataset returns for the same index: the stored
uint8 image (HDF5 row or TIFF), converted to the task's ``input_size`` channels (RGB -> gray with
PIL's ``convert("L")`` integer formula, gray -> RGB by repetition), resized to ``input_size``
with PIL's bilinear filter when the stored size differs, scaled to [0, 1] and normalised with
mean 0.5 / std 0.5; the label is ``torch.as_tensor`` of the stored value (binary labels with
shape ``(1,)``). The conversion is :class:`medmeta.data.transforms.ImageTransform`, shared by
every image source.

Differences that matter for speed and safety, not for values:

* :meth:`read_images` reads many indices in one sorted call and restores the order asked for;
  the float conversion and normalisation run on the batch in cache-sized chunks (same float32
  bits as the official per-image operations), optionally into a caller's preallocated ``out``
  tensor, and any user ``transform`` runs on the batch tensor. DataLoaders use the same path
  through ``__getitems__``.
* MedIMeta's ``images`` dataset is stored contiguously without compression, so it is read
  through a read-only ``np.memmap`` at the dataset's file offset (h5py selections cost a lot
  per row); chunked or compressed files (e.g. user-written ones) are read through h5py.
* the file is opened lazily in each process (the pid is remembered), so forked and spawned
  DataLoader workers each hold their own handle or map; the source pickles without it.
* labels and image indices are numpy arrays available without touching any image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medmeta.data.info import DatasetInfo, TaskInfo, read_info
from medmeta.data.layout import (
    HDF5_DATASET,
    HDF5_FILE,
    IMAGE_DIR,
    INFO_FILE,
    SplitArg,
    inspect_hdf5,
    load_task_labels,
    resolve_split_indices,
    tiff_path,
)
from medmeta.data.source import Positions, TaskSource, unique_indices
from medmeta.data.transforms import ImageTransform, check_channels, check_normalize, parse_size
from medmeta.errors import DataFormatError, MissingDataError, UnknownNameError, known_names
from medmeta.tasks import TaskTarget

__all__ = ["MedIMetaTaskSource", "find_dataset_dir"]

BatchTransform = Callable[[Tensor], Tensor]
"""A user transform on the normalised float batch ``(B, C, H, W)``."""


def _memory_map(path: Path, ds: Any) -> Optional[np.ndarray]:
    """A read-only ``np.memmap`` of an HDF5 dataset stored contiguously, uncompressed and
    unfiltered (MedIMeta's layout), else ``None``. Fancy indexing a memory map reads only the
    rows asked for, without h5py's per-row selection overhead."""
    try:
        if ds.chunks is not None or ds.compression is not None or ds.external or ds.dtype != np.uint8:
            return None
        offset = ds.id.get_offset()
    except Exception:  # pragma: no cover - h5py versions without these attributes
        return None
    if offset is None or ds.size == 0:
        return None
    return np.memmap(path, dtype=np.uint8, mode="r", offset=int(offset), shape=tuple(ds.shape))


def find_dataset_dir(root_or_dataset_dir: "str | Path", dataset_id: Optional[str]) -> tuple[Path, DatasetInfo]:
    """The folder and info of ``dataset_id``: ``root_or_dataset_dir`` is either that folder (it
    holds ``info.yaml``) or a root with one folder per dataset (named by id, else found by the
    ``id`` inside its ``info.yaml``)."""
    path = Path(root_or_dataset_dir).expanduser()
    if not path.exists():
        raise MissingDataError(f"{path}: folder not found (expected a MedIMeta root or dataset folder)")
    if (path / INFO_FILE).is_file():
        info = read_info(path)
        if dataset_id is not None and info.id != dataset_id:
            raise UnknownNameError(
                f"{path}: this dataset folder holds dataset {info.id!r} ({path / INFO_FILE}), not {dataset_id!r}"
            )
        return path, info
    looks_like_dataset = any((path / name).exists() for name in (HDF5_FILE, IMAGE_DIR, "task_labels", "splits"))
    if looks_like_dataset:
        raise MissingDataError(f"{path / INFO_FILE}: info.yaml not found (every dataset folder needs one)")
    if dataset_id is None:
        raise ValueError(f"dataset_id: required when {path} is a root folder and not a dataset folder")
    if (path / dataset_id).is_dir() and not (path / dataset_id / INFO_FILE).is_file():
        raise MissingDataError(f"{path / dataset_id / INFO_FILE}: info.yaml not found (every dataset folder needs one)")
    if (path / dataset_id / INFO_FILE).is_file():
        info = read_info(path / dataset_id)
        if info.id == dataset_id:
            return path / dataset_id, info
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / INFO_FILE).is_file()):
        info = read_info(sub)
        if info.id == dataset_id:
            return sub, info
        found[info.id] = sub
    raise UnknownNameError(f"dataset_id={dataset_id!r}: no such dataset under {path}; {known_names(dataset_id, found)}")


class MedIMetaTaskSource(TaskSource):
    """One task of one dataset in the MedIMeta format (see module doc).

    Args:
        root_or_dataset_dir: the data root (one folder per dataset) or the dataset folder.
        dataset_id: the dataset's ``id`` (``None`` allowed when a dataset folder is given).
        task_name: a task of ``info.yaml``.
        split / original_split: a split name or a list (concatenated, sorted by index); not both;
            neither selects every image. A split counted 0 in ``info.yaml`` has no samples.
        transform: optional callable on the normalised float batch ``(B, C, H, W)`` (e.g.
            torchvision v2 augmentations); it runs after the default conversion.
        channels: output channels; ``None`` follows ``input_size`` like the official loader,
            ``3`` forces RGB as in the MedIMeta paper's experiments, ``1`` forces grayscale.
        image_format: ``"hdf5"`` (``images.hdf5``) or ``"tiff"`` (``images/NNNNNN.tiff``).
        normalize: ``"official"`` (mean = std = 0.5), ``"imagenet"`` or ``None`` (values in [0, 1]).
        image_size: output ``(H, W)`` or an int for squares; ``None`` uses ``input_size``.
        info: an already parsed ``DatasetInfo`` of this folder (saves re-reading it).
        memory_map: read a contiguous, unfiltered ``images`` dataset through a read-only memory
            map (same bytes, much less per-row overhead than h5py selections); ``False`` always
            reads through h5py.
    """

    def __init__(
        self,
        root_or_dataset_dir: "str | Path",
        dataset_id: Optional[str],
        task_name: str,
        split: SplitArg = None,
        original_split: SplitArg = None,
        transform: Optional[BatchTransform] = None,
        channels: Optional[int] = None,
        image_format: str = "hdf5",
        normalize: Optional[str] = "official",
        *,
        image_size: Union[int, Sequence[int], None] = None,
        info: Optional[DatasetInfo] = None,
        memory_map: bool = True,
    ) -> None:
        if info is not None:
            self.dataset_dir = Path(root_or_dataset_dir)
            if dataset_id is not None and info.id != dataset_id:
                raise ValueError(f"info: describes dataset {info.id!r}, not dataset_id={dataset_id!r}")
        else:
            self.dataset_dir, info = find_dataset_dir(root_or_dataset_dir, dataset_id)
        self.info: DatasetInfo = info
        self.dataset_id: str = info.id
        self.task_info: TaskInfo = info.task(task_name)
        self.task_name = task_name
        self.description = self.task_info.description(info)
        if image_format not in ("hdf5", "tiff"):
            raise ValueError(f"image_format: expected 'hdf5' or 'tiff', got {image_format!r}")
        self.image_format = image_format
        channels = check_channels(channels)
        self.num_channels: int = channels if channels is not None else info.num_channels
        self.normalize = check_normalize(normalize)
        size = parse_size(image_size, info.input_size[1:])
        assert size is not None  # a default is given
        self.image_size: tuple[int, int] = size
        self.image_transform = ImageTransform(self.num_channels, self.image_size, self.normalize)
        """The conversion of stored images (channels, size, normalisation), one hashable value."""
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable on (B, C, H, W) float tensors, got {type(transform).__name__}")
        self.transform = transform

        all_labels = load_task_labels(self.dataset_dir, info, self.task_info)
        self.image_indices, self.split = resolve_split_indices(self.dataset_dir, info, split, original_split)
        self.labels: np.ndarray = all_labels[self.image_indices]

        self.hdf5_path = self.dataset_dir / HDF5_FILE
        self.stored_channels: Optional[int] = None
        if image_format == "hdf5":
            shape = inspect_hdf5(self.hdf5_path, expected_images=info.total_num_samples)
            self.stored_channels = shape.channels
        elif not (self.dataset_dir / IMAGE_DIR).is_dir():
            raise MissingDataError(f"{self.dataset_dir / IMAGE_DIR}: TIFF image folder not found (image_format='tiff')")
        self.memory_map = bool(memory_map)
        self._h5file: Any = None
        self._h5images: Any = None
        self._h5pid: Optional[int] = None

    # -- TaskSource ------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this source returns."""
        return (self.num_channels, *self.image_size)

    def read_images(self, positions: Positions, *, out: Optional[Tensor] = None) -> Tensor:
        """Images at item ``positions`` as ``(B, C, H, W)`` float32, in the order given.

        Through h5py, the rows are read in one sorted fancy-index call (repeats read once); through
        the memory map, rows are gathered chunk by chunk in the order asked for. The conversion
        (:class:`~medmeta.data.transforms.ImageTransform`) runs on chunks of about 256 KiB written
        into one output tensor: ``out`` when given (a contiguous CPU float32 tensor of exactly
        that shape, e.g. reused from the previous batch: no fresh memory to page in), else a new
        one. ``transform`` then runs on the whole batch (its result is returned; ``out`` holds
        the converted images before it).
        """
        pos = self.check_positions(positions)
        indices = self.image_indices[pos]
        n = len(pos)
        if self.image_format == "hdf5":
            ds = self._images()
            if isinstance(ds, np.ndarray):  # memory map: gather rows in the requested order
                def fetch(sel: slice) -> np.ndarray:
                    return ds[indices[sel]]
            else:
                unique, inverse, in_order = unique_indices(indices)
                raw = self._read_hdf5(unique)

                def fetch(sel: slice) -> np.ndarray:
                    return raw[sel] if in_order else raw[inverse[sel]]
            result = self.image_transform.rows(fetch, n, ds.shape[1:], out=out)
        else:
            buffer = self.image_transform.output_buffer(n, self.image_size, out)
            unique, inverse, in_order = unique_indices(indices)
            result = self.image_transform.images([self._read_tiff(int(i)) for i in unique])
            if not in_order:
                result = result[torch.from_numpy(inverse)]
            if out is not None:
                result = buffer.copy_(result)
        if self.transform is not None:
            result = self.transform(result)
        return result

    def feature_cache_identity(self) -> Optional[dict[str, Any]]:
        """What names this source's images for an on-disk feature cache
        (:mod:`medmeta.evaluation.feature_cache`): dataset id, image format, size and
        modification time of the image file (TIFF: of the image folder and ``info.yaml``) and the
        image transform; ``None`` with a user ``transform`` (a callable cannot be named)."""
        if self.transform is not None:
            return None
        stamp = self.hdf5_path if self.image_format == "hdf5" else self.dataset_dir / IMAGE_DIR
        stats = [stamp.stat()] + ([] if self.image_format == "hdf5" else [(self.dataset_dir / INFO_FILE).stat()])
        return {
            "dataset_id": self.dataset_id,
            "image_format": self.image_format,
            "file": [[int(st.st_size), int(st.st_mtime_ns)] for st in stats],
            "transform": repr(self.image_transform),
        }

    def label_tensor(self, position: int) -> Tensor:
        """The label of one item as the official loader returns it (binary: shape ``(1,)``)."""
        label = torch.as_tensor(self.labels[position])
        if self.description.task_target is TaskTarget.BINARY_CLASSIFICATION:
            label = label.reshape(1)
        return label

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        position = int(position)
        if position < 0:  # sequence semantics, as the official loader's list indexing
            position += len(self)
        position = int(self.check_positions([position])[0])
        return self.read_images([position])[0], self.label_tensor(position)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch used by ``torch.utils.data.DataLoader``: one read per batch."""
        pos = self.check_positions(positions)
        images = self.read_images(pos)
        return [(images[i], self.label_tensor(int(p))) for i, p in enumerate(pos)]

    def class_counts(self) -> dict[int, int]:
        """Items per label key (multi-label: positives per label column), in key order."""
        return class_counts(self.labels, self.task_info)

    # -- reading ---------------------------------------------------------------------------------
    def _images(self) -> Any:
        """The stored images, opened once per process: a read-only memory map of the HDF5
        ``images`` dataset when it is stored contiguously without filters (as MedIMeta's files
        are), else the h5py dataset itself."""
        pid = os.getpid()
        if self._h5images is None or self._h5pid != pid:
            import h5py

            self._h5file = self._h5images = None  # a handle inherited through fork is never used
            try:
                self._h5file = h5py.File(self.hdf5_path, "r")
                ds = self._h5file[HDF5_DATASET]
                self._h5images = ds
                if self.memory_map:
                    mapped = _memory_map(self.hdf5_path, ds)
                    if mapped is not None:
                        self._h5file.close()
                        self._h5file, self._h5images = None, mapped
            except (OSError, KeyError) as err:
                raise DataFormatError(
                    f"{self.hdf5_path}: cannot open dataset {HDF5_DATASET!r} ({err}); expected an HDF5 file with a "
                    f"uint8 dataset 'images'"
                ) from None
            self._h5pid = pid
        return self._h5images

    def _read_hdf5(self, sorted_indices: np.ndarray) -> np.ndarray:
        ds = self._images()
        if len(sorted_indices) == 0:
            return np.zeros((0, *ds.shape[1:]), dtype=np.uint8)
        lo, hi = int(sorted_indices[0]), int(sorted_indices[-1]) + 1
        if hi - lo == len(sorted_indices):  # a contiguous run: a plain slice is the cheapest read
            return np.array(ds[lo:hi])
        return np.asarray(ds[sorted_indices])  # one sorted read (memory map or h5py hyperslab selection)

    def _read_tiff(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = tiff_path(self.dataset_dir, index)
        try:
            with Image.open(path) as image:
                if image.mode not in ("L", "RGB"):
                    raise DataFormatError(f"{path}: TIFF image has mode {image.mode!r}, expected 8-bit 'L' or 'RGB'")
                return np.asarray(image)
        except FileNotFoundError:
            raise MissingDataError(f"{path}: TIFF image {index} not found (image_format='tiff')") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataFormatError(f"{path}: cannot be read as a TIFF image ({err})") from None

    # -- pickling / lifetime ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5file"] = state["_h5images"] = state["_h5pid"] = None  # never pickle a handle or a map
        return state

    def close(self) -> None:
        """Close this process's HDF5 handle (it reopens on the next read)."""
        if self._h5file is not None and self._h5pid == os.getpid():
            try:
                self._h5file.close()
            except Exception:  # pragma: no cover - closing an already closed file
                pass
        self._h5file = self._h5images = self._h5pid = None  # a memory map is released with its last reference

    def __enter__(self) -> "MedIMetaTaskSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MedIMetaTaskSource({self.dataset_id!r}, {self.task_name!r}, split={self.split!r}, n={len(self)}, "
            f"target={self.description.task_target.value}, image_shape={self.image_shape}, "
            f"format={self.image_format!r}, normalize={self.normalize!r})"
        )


def class_counts(labels: np.ndarray, task: TaskInfo) -> dict[int, int]:
    """Items per label key of raw labels (multi-label: positives per column), in key order."""
    labels = np.asarray(labels)
    if task.task_target is TaskTarget.MULTILABEL_CLASSIFICATION:
        sums = labels.reshape(len(labels), -1).sum(axis=0) if len(labels) else np.zeros(task.num_classes)
        return {k: int(sums[k]) for k in task.label_keys}
    flat = labels.reshape(-1)
    return {k: int(np.count_nonzero(flat == k)) for k in task.label_keys}
