"""2-D segmentation task sources and few-shot segmentation episodes.

Two sources, one interface (a :class:`~medmeta.data.source.TaskSource` plus ``read_masks``):

* :class:`SegmentationTaskSource`: a 2-D set in the MedIMeta layout whose ``images.hdf5`` holds a
  dataset ``masks`` (uint8 ``(N, H, W)``, 0 = background, other values the task's label keys)
  beside ``images``; :func:`write_segmentation_set` writes one.
* :class:`VolumeSliceSource`: the slices of 3-D volumes (NIfTI) along an axis, CT-windowed, with
  the volume and slice index of every item, so episodes can hold out whole volumes.

Masks leave a source as ``int64 (B, H, W)`` with the task's label keys mapped to positions
``1..L`` (0 = background). ``labels`` is the ``(N, L)`` 0/1 presence of each label per slice,
so samplers pick slices without reading masks.

:class:`SegmentationEpisodeSampler` draws K annotated support slices (or volumes) and query
slices (or volumes) per episode, seeded per episode so any episode can be replayed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medmeta.adapters.segmentation.volumes import read_image_and_label, to_slices, window_ct
from medmeta.data.info import DatasetInfo, TaskInfo
from medmeta.data.layout import (
    HDF5_DATASET,
    HDF5_FILE,
    INFO_FILE,
    SplitArg,
    format_split_file,
    inspect_hdf5,
    label_path,
    resolve_split_indices,
    split_path,
)
from medmeta.data.medimeta import find_dataset_dir
from medmeta.data.source import Positions, TaskSource, unique_indices
from medmeta.data.transforms import (
    ImageTransform,
    check_channels,
    check_normalize,
    normalize_,
    parse_size,
    resize_float,
    resize_masks,
)
from medmeta.errors import DataFormatError
from medmeta.io import atomic_path, write_bytes_atomic
from medmeta.tasks import Episode, TaskDescription, TaskTarget

__all__ = [
    "MASKS_DATASET",
    "write_segmentation_set",
    "SegmentationTaskSource",
    "VolumeSliceSource",
    "SegmentationEpisodeSampler",
    "remap_mask",
    "prepare_slices",
]

MASKS_DATASET = "masks"
"""Name of the mask dataset beside ``images`` in ``images.hdf5``."""


def remap_mask(mask: np.ndarray, label_keys: Sequence[int], where: str = "mask") -> np.ndarray:
    """Raw label keys -> positions ``1..L`` (int64); 0 stays background. A value that is neither
    0 nor a key raises, naming ``where``."""
    mask = np.asarray(mask)
    keys = np.asarray(list(label_keys), dtype=np.int64)
    values = np.unique(mask)
    unknown = np.setdiff1d(values, np.concatenate([[0], keys]))
    if len(unknown):
        raise DataFormatError(
            f"{where}: mask values {unknown[:10].tolist()} are not 0 (background) or a label key {keys.tolist()}"
        )
    lut = np.zeros(int(max(values.max(initial=0), keys.max(initial=0))) + 1, dtype=np.int64)
    lut[keys] = np.arange(1, len(keys) + 1)
    return lut[mask.astype(np.int64)]


def prepare_slices(
    image: np.ndarray,
    axis: int = 2,
    window: Optional[tuple[float, float]] = (40.0, 400.0),
    normalize: Optional[str] = "official",
) -> np.ndarray:
    """A volume's slices ``(S, H, W)`` float32 as a model sees them: CT window ``(level, width)``
    to [0, 1] (``None``: taken as already in [0, 1]), then MedIMeta's normalisation
    (:func:`medmeta.data.transforms.normalize_`, one channel). Support and query volumes must go
    through the same function."""
    check_normalize(normalize)
    scaled = window_ct(image, *window) if window is not None else np.asarray(image, dtype=np.float32)
    slices = np.array(to_slices(scaled, axis), dtype=np.float32, order="C")  # a copy: normalised in place
    if normalize is not None:
        normalize_(torch.from_numpy(slices)[:, None], normalize)
    return slices


def _presence(masks: np.ndarray, num_labels: int) -> np.ndarray:
    """``(N, L)`` uint8: does slice n contain position l+1."""
    flat = masks.reshape(len(masks), -1)
    if not num_labels:
        return np.zeros((len(masks), 0), dtype=np.uint8)
    return np.stack([(flat == label).any(axis=1) for label in range(1, num_labels + 1)], axis=1).astype(np.uint8)


def write_segmentation_set(
    dataset_dir: "str | Path",
    images: np.ndarray,
    masks: np.ndarray,
    labels: Mapping[int, str],
    dataset_id: str,
    name: Optional[str] = None,
    domain: str = "unknown",
    task_name: str = "segmentation",
    splits: Optional[Mapping[str, Sequence[int]]] = None,
    summary: str = "",
    license: str = "",
) -> Path:
    """Write a 2-D segmentation set in the MedIMeta layout (see module doc).

    ``images``: uint8 ``(N, H, W)`` or ``(N, H, W, 3)``; ``masks``: integer ``(N, H, W)`` with 0
    and the keys of ``labels`` ({key: class name}, keys 1..255). ``splits`` maps split names to
    image indices (default: everything in ``train``). Also writes ``task_labels/<task>.npy`` as the
    ``(N, L)`` presence of each label. Each file is written atomically.
    """
    dataset_dir = Path(dataset_dir)
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"images: expected uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks: expected shape {images.shape[:3]} (one mask per image), got {masks.shape}")
    keys = sorted(int(k) for k in labels)
    if not keys or keys[0] < 1 or keys[-1] > 255:
        raise ValueError(f"labels: expected keys in 1..255 (0 is background), got {keys}")
    positions = remap_mask(masks, keys, where="masks")
    n = len(images)
    splits = {"train": list(range(n))} if splits is None else {k: list(v) for k, v in splits.items()}
    counted = sorted(i for v in splits.values() for i in v)
    if counted != list(range(n)):
        raise ValueError(f"splits: every image index 0..{n - 1} must be in exactly one split")
    target = TaskTarget.BINARY_SEGMENTATION if len(keys) == 1 else TaskTarget.MULTILABEL_SEGMENTATION
    info = DatasetInfo(
        id=dataset_id, name=name or dataset_id, domain=domain, summary=summary, license=license,
        tasks=(TaskInfo(task_name=task_name, task_target=target, labels={k: str(labels[k]) for k in keys}),),
        input_size=(1 if images.ndim == 3 else 3, int(images.shape[1]), int(images.shape[2])),
        total_num_samples=n, splits_num_samples={k: len(v) for k, v in splits.items()},
    )
    DatasetInfo.from_dict(info.to_dict(), where=str(dataset_dir / INFO_FILE))  # validate before writing
    dataset_dir.mkdir(parents=True, exist_ok=True)
    import h5py

    with atomic_path(dataset_dir / HDF5_FILE) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(HDF5_DATASET, data=images)
            f.create_dataset(MASKS_DATASET, data=masks.astype(np.uint8))
    for split, indices in splits.items():
        write_bytes_atomic(split_path(dataset_dir, split), format_split_file(sorted(indices)).encode("utf-8"))
    presence = _presence(positions, len(keys))
    path = label_path(dataset_dir, task_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buffer = io.BytesIO()
    np.save(buffer, presence, allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())
    write_bytes_atomic(dataset_dir / INFO_FILE, info.to_yaml().encode("utf-8"))
    return dataset_dir


class _MaskSource(TaskSource):
    """Shared parts: label positions, selecting the labels an episode asks for."""

    num_labels: int

    def read_masks(self, positions: Positions) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.read_images([position])[0], self.read_masks([position])[0]


class SegmentationTaskSource(_MaskSource):
    """A 2-D segmentation task of a MedIMeta-layout folder with ``masks`` in ``images.hdf5``.

    Images are converted exactly as the classification reader converts them (one
    :class:`~medmeta.data.transforms.ImageTransform`: RGB -> grey with PIL's formula, grey
    repeated for ``channels=3``, PIL bilinear resize to ``image_size``, ``normalize``); masks are
    resized nearest. ``task_name`` may be omitted when the dataset has one segmentation task.
    """

    def __init__(
        self,
        root_or_dataset_dir: "str | Path",
        dataset_id: Optional[str] = None,
        task_name: Optional[str] = None,
        split: SplitArg = None,
        original_split: SplitArg = None,
        channels: Optional[int] = None,
        normalize: Optional[str] = "official",
        image_size: Union[int, Sequence[int], None] = None,
    ) -> None:
        import h5py

        self.dataset_dir, info = find_dataset_dir(root_or_dataset_dir, dataset_id)
        self.info = info
        seg_tasks = [t for t in info.tasks if t.task_target.is_segmentation]
        if task_name is None:
            if len(seg_tasks) != 1:
                raise ValueError(
                    f"task_name: {info.path} has {len(seg_tasks)} segmentation tasks "
                    f"({[t.task_name for t in seg_tasks]}); name one"
                )
            task = seg_tasks[0]
        else:
            task = info.task(task_name)
        if not task.task_target.is_segmentation:
            raise ValueError(
                f"task_name: task {task.task_name!r} of {info.path} is {task.task_target.value}, not a segmentation task"
            )
        if 0 in task.labels:  # a listed background class: masks use 0 for it anyway
            task = TaskInfo(task.task_name, task.task_target, {k: v for k, v in task.labels.items() if k != 0})
        if not task.labels or min(task.labels) < 1:
            raise DataFormatError(
                f"{info.path}: task {task.task_name!r} needs label keys >= 1 (0 is background), got {sorted(task.labels)}"
            )
        self.task_info = task
        self.description = task.description(info)
        self.num_labels = task.num_classes
        channels = check_channels(channels)
        self.num_channels = channels if channels is not None else info.num_channels
        self.normalize = check_normalize(normalize)
        self.image_size = parse_size(image_size)
        self.image_transform = ImageTransform(self.num_channels, self.image_size, self.normalize)
        self.image_indices, self.split = resolve_split_indices(self.dataset_dir, info, split, original_split)
        self.hdf5_path = self.dataset_dir / HDF5_FILE
        shape = inspect_hdf5(self.hdf5_path, expected_images=info.total_num_samples)
        with h5py.File(self.hdf5_path, "r") as f:
            if MASKS_DATASET not in f:
                raise DataFormatError(
                    f"{self.hdf5_path}: no dataset {MASKS_DATASET!r} (has {sorted(f.keys())}); a segmentation set "
                    f"stores its masks beside 'images' as uint8 (N, H, W)"
                )
            mshape, mdtype = tuple(f[MASKS_DATASET].shape), f[MASKS_DATASET].dtype
            if mshape != (shape.num_images, shape.height, shape.width) or mdtype.kind not in "iu":
                raise DataFormatError(
                    f"{self.hdf5_path}: dataset {MASKS_DATASET!r} is {mdtype} {mshape}, expected an integer array of "
                    f"shape {(shape.num_images, shape.height, shape.width)} like 'images'"
                )
            presence_path = label_path(self.dataset_dir, task.task_name)
            presence = None
            if presence_path.is_file():
                try:
                    presence = np.load(presence_path, allow_pickle=False)
                except (ValueError, OSError) as err:
                    raise DataFormatError(f"{presence_path}: not a readable .npy array ({err})") from None
                if presence.shape != (info.total_num_samples, self.num_labels):
                    presence = None
            if presence is None:  # compute from the masks, in chunks
                parts = []
                for lo in range(0, shape.num_images, 256):
                    raw = f[MASKS_DATASET][lo : lo + 256]
                    parts.append(_presence(remap_mask(raw, task.label_keys, f"{self.hdf5_path}:masks"), self.num_labels))
                presence = np.concatenate(parts) if parts else np.zeros((0, self.num_labels), np.uint8)
        self.labels = np.asarray(presence)[self.image_indices].astype(np.uint8)
        self._h5: Any = None
        self._h5pid: Optional[int] = None

    def _file(self) -> Any:
        if self._h5 is None or self._h5pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.hdf5_path, "r")
            self._h5pid = os.getpid()
        return self._h5

    def _read(self, name: str, positions: Positions) -> tuple[np.ndarray, Optional[Tensor]]:
        """Stored rows of dataset ``name`` (one sorted read, repeats once) and the reordering
        that gives them in the order asked for (``None``: already in order)."""
        pos = self.check_positions(positions)
        unique, inverse, in_order = unique_indices(self.image_indices[pos])
        ds = self._file()[name]
        raw = ds[unique] if len(unique) else np.zeros((0, *ds.shape[1:]), ds.dtype)
        return raw, None if in_order else torch.from_numpy(inverse)

    def read_images(self, positions: Positions) -> Tensor:
        raw, order = self._read(HDF5_DATASET, positions)
        images = self.image_transform(raw)
        return images if order is None else images[order]

    def read_masks(self, positions: Positions) -> Tensor:
        raw, order = self._read(MASKS_DATASET, positions)
        masks = torch.from_numpy(remap_mask(raw, self.task_info.label_keys, f"{self.hdf5_path}:{MASKS_DATASET}"))
        if self.image_size is not None:
            masks = resize_masks(masks, self.image_size)
        return masks if order is None else masks[order]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = state["_h5pid"] = None
        return state


class VolumeSliceSource(_MaskSource):
    """Slices of labelled volumes along ``axis``, CT-windowed to [0, 1] then normalised like
    MedIMeta images (``normalize="official"``: mean 0.5, std 0.5).

    Args:
        images / masks: lists of 3-D arrays (HU and integer labels) of equal in-plane size, or
            any sizes with ``size=(H, W)`` (images bilinear, masks nearest).
        spacings: voxel spacing (mm) of each volume, kept for 3-D metrics.
        labels: ``{label key: name}`` of the task (e.g. the FLARE labels).
        window: ``(level, width)`` in HU, or ``None`` to take images as already scaled to [0, 1].
        names: a name per volume (case ids), for reports.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        labels: Mapping[int, str],
        spacings: Optional[Sequence[Sequence[float]]] = None,
        axis: int = 2,
        window: Optional[tuple[float, float]] = (40.0, 400.0),
        size: Optional[Sequence[int]] = None,
        normalize: Optional[str] = "official",
        names: Optional[Sequence[str]] = None,
        dataset_id: str = "volumes",
        domain: str = "CT",
    ) -> None:
        if len(images) != len(masks) or not len(images):
            raise ValueError(f"images / masks: expected the same positive number of volumes, got {len(images)} / {len(masks)}")
        keys = sorted(int(k) for k in labels)
        self.names = [str(n) for n in names] if names is not None else [f"volume_{i:03d}" for i in range(len(images))]
        self.spacings = [tuple(float(s) for s in sp) for sp in spacings] if spacings is not None else [(1.0,) * 3] * len(images)
        self.axis = int(axis)
        target = TaskTarget.BINARY_SEGMENTATION if len(keys) == 1 else TaskTarget.MULTILABEL_SEGMENTATION
        self.description = TaskDescription(
            task_target=target, classes=tuple(str(labels[k]) for k in keys), task_identifier=f"{dataset_id}: segmentation",
            domain_identifier=domain, label_keys=tuple(keys), dataset_id=dataset_id, task_name="segmentation",
        )
        self.num_labels = len(keys)
        size_t = parse_size(size)
        image_parts: list[Tensor] = []
        mask_parts: list[Tensor] = []
        vol_ids: list[np.ndarray] = []
        slice_ids: list[np.ndarray] = []
        for v, (image, mask) in enumerate(zip(images, masks)):
            image, mask = np.asarray(image), np.asarray(mask)
            where = self.names[v]
            if image.shape != mask.shape or image.ndim != 3:
                raise DataFormatError(f"{where}: image shape {image.shape} and mask shape {mask.shape} must be equal and 3-D")
            img_s = torch.from_numpy(prepare_slices(image, axis, window, normalize))[:, None]
            msk_s = torch.from_numpy(np.ascontiguousarray(to_slices(remap_mask(mask, keys, where), axis)))
            if size_t is not None:
                img_s, msk_s = resize_float(img_s, size_t), resize_masks(msk_s, size_t)
            if image_parts and img_s.shape[-2:] != image_parts[0].shape[-2:]:
                raise DataFormatError(
                    f"{where}: slices are {tuple(img_s.shape[-2:])}, those of {self.names[0]} "
                    f"{tuple(image_parts[0].shape[-2:])}; pass size=(H, W) to resize"
                )
            image_parts.append(img_s)
            mask_parts.append(msk_s)
            vol_ids.append(np.full(len(img_s), v, dtype=np.int64))
            slice_ids.append(np.arange(len(img_s), dtype=np.int64))
        self.images = torch.cat(image_parts).contiguous()
        self.masks = torch.cat(mask_parts).contiguous()
        self.volume_ids = np.concatenate(vol_ids)
        self.slice_indices = np.concatenate(slice_ids)
        self.image_indices = np.arange(len(self.images), dtype=np.int64)
        self.labels = _presence(self.masks.numpy(), self.num_labels)
        self.split = "volumes"

    @classmethod
    def from_files(
        cls, pairs: Sequence[tuple["str | Path", "str | Path"]], labels: Mapping[int, str], **kwargs: Any
    ) -> "VolumeSliceSource":
        """Read ``(image, label)`` NIfTI pairs (shapes and spacings checked per pair)."""
        images, masks, spacings, names = [], [], [], []
        for image_path, mask_path in pairs:
            image, mask = read_image_and_label(image_path, mask_path)
            images.append(image.data)
            masks.append(mask.data)
            spacings.append(image.spacing)
            names.append(image.name)
        kwargs.setdefault("names", names)
        return cls(images, masks, labels, spacings=spacings, **kwargs)

    @property
    def num_volumes(self) -> int:
        return len(self.names)

    def read_images(self, positions: Positions) -> Tensor:
        return self.images[torch.from_numpy(self.check_positions(positions))]

    def read_masks(self, positions: Positions) -> Tensor:
        return self.masks[torch.from_numpy(self.check_positions(positions))]

    def volume_positions(self, volume: int) -> np.ndarray:
        """Item positions of one volume's slices, in slice order."""
        return np.flatnonzero(self.volume_ids == int(volume))


class SegmentationEpisodeSampler:
    """Few-shot segmentation episodes from a source with ``read_masks``.

    Args:
        source: a :class:`SegmentationTaskSource` or :class:`VolumeSliceSource`.
        n_support / n_query: slices (``unit="slice"``) or volumes (``unit="volume"``, needs a
            source with ``volume_ids``) per episode.
        label_keys: the labels the episode segments (default all), remapped to ``1..k`` in the
            given order; other labels become background. One label gives a binary (1-way) task.
        require_foreground: support slices must contain one of the labels (in volume mode,
            only such slices of the support volumes are kept); query slices in slice mode too.
            In slice mode the support first takes one slice per label (as far as ``n_support``
            allows), so every label has an annotated example when it can.
        seed: episode ``i`` uses ``numpy.random.default_rng([seed, i])``.
    """

    def __init__(
        self,
        source: _MaskSource,
        n_support: int = 1,
        n_query: int = 4,
        label_keys: Optional[Sequence[int]] = None,
        unit: str = "slice",
        require_foreground: bool = True,
        seed: int = 0,
    ) -> None:
        if unit not in ("slice", "volume"):
            raise ValueError(f"unit: expected 'slice' or 'volume', got {unit!r}")
        if unit == "volume" and not hasattr(source, "volume_ids"):
            raise ValueError(f"unit='volume': {type(source).__name__} has no volume ids; use unit='slice'")
        if n_support < 1 or n_query < 1:
            raise ValueError(f"n_support / n_query: expected positive counts, got {n_support} / {n_query}")
        all_keys = list(source.description.label_keys)
        keys = list(all_keys if label_keys is None else [int(k) for k in label_keys])
        missing = [k for k in keys if k not in all_keys]
        if missing or not keys or len(set(keys)) != len(keys):
            raise ValueError(f"label_keys: {keys} must be distinct keys of the task, which has {all_keys}")
        self.source, self.unit, self.seed = source, unit, int(seed)
        self.n_support, self.n_query = int(n_support), int(n_query)
        self.require_foreground = bool(require_foreground)
        self.keys = keys
        self.label_positions = [all_keys.index(k) for k in keys]
        description = source.description.subset(self.label_positions)
        if len(keys) == 1:
            from dataclasses import replace

            description = replace(description, task_target=TaskTarget.BINARY_SEGMENTATION)
        self.description = description
        lut = np.zeros(len(all_keys) + 1, dtype=np.int64)
        lut[np.asarray(self.label_positions) + 1] = np.arange(1, len(keys) + 1)
        self._lut = torch.from_numpy(lut)
        self.foreground = source.labels[:, self.label_positions].any(axis=1)
        if unit == "slice":
            pool = np.flatnonzero(self.foreground) if require_foreground else np.arange(len(source))
            if len(pool) < self.n_support + self.n_query:
                raise ValueError(
                    f"{source.description.task_identifier}: {len(pool)} slices with labels {keys}, fewer than "
                    f"n_support + n_query = {self.n_support + self.n_query}"
                )
            self._pool = pool
        else:
            volumes = np.unique(source.volume_ids)  # type: ignore[attr-defined]
            if len(volumes) < self.n_support + self.n_query:
                raise ValueError(
                    f"{source.description.task_identifier}: {len(volumes)} volumes, fewer than n_support + n_query = "
                    f"{self.n_support + self.n_query}"
                )
            self._pool = volumes

    def _masks(self, positions: np.ndarray) -> Tensor:
        return self._lut[self.source.read_masks(positions)]

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (deterministic for a given seed)."""
        rng = np.random.default_rng([self.seed, int(index)])
        chosen = rng.permutation(self._pool)[: self.n_support + self.n_query]
        info: dict[str, Any] = {"unit": self.unit, "label_keys": self.keys, "instance": int(index), "seed": self.seed}
        if self.unit == "slice":
            # support covers as many of the episode's labels as n_support allows, then random slices
            presence = self.source.labels[:, self.label_positions]
            support_list: list[int] = []
            for col in rng.permutation(len(self.keys)):
                if len(support_list) >= self.n_support or presence[support_list, col].any():
                    continue
                having = self._pool[presence[self._pool, col] > 0]
                having = having[~np.isin(having, support_list)]
                if len(having):
                    support_list.append(int(rng.choice(having)))
            rest = rng.permutation(self._pool[~np.isin(self._pool, support_list)])
            support_list += rest[: self.n_support - len(support_list)].tolist()
            rest = rest[~np.isin(rest, support_list)]
            support, query = np.sort(np.asarray(support_list, dtype=np.int64)), np.sort(rest[: self.n_query])
        else:
            vids = self.source.volume_ids  # type: ignore[attr-defined]
            sv, qv = np.sort(chosen[: self.n_support]), np.sort(chosen[self.n_support :])
            keep = self.foreground if self.require_foreground else np.ones(len(vids), dtype=bool)
            support = np.flatnonzero(np.isin(vids, sv) & keep)
            query = np.flatnonzero(np.isin(vids, qv))
            info.update(support_volumes=sv.tolist(), query_volumes=qv.tolist())
        return Episode(
            support_images=self.source.read_images(support),
            support_labels=self._masks(support),
            query_images=self.source.read_images(query),
            query_labels=self._masks(query),
            description=self.description,
            support_indices=self.source.image_indices[support],
            query_indices=self.source.image_indices[query],
            info=info,
        )

    def __iter__(self) -> Iterator[Episode]:
        index = 0
        while True:
            yield self.episode(index)
            index += 1
