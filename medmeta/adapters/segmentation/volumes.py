"""3-D volumes from NIfTI files: reading with voxel spacing, atomic writing with the same
geometry, CT intensity windowing, slicing along an axis and slice-wise / sliding-window inference.

Arrays keep nibabel's axis order (``x, y, z`` for a canonical scan): ``Volume.data[i, j, k]`` is
the voxel at index ``(i, j, k)`` and ``Volume.spacing[a]`` is its size in millimetres along axis
``a`` (the header's ``pixdim``, as FLARE's evaluation reads it). Every error names the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from medmeta.errors import DataFormatError, MissingDataError
from medmeta.io import atomic_path

__all__ = [
    "NIFTI_SUFFIXES",
    "CT_WINDOWS",
    "Volume",
    "is_nifti_path",
    "case_name",
    "read_volume",
    "read_image_and_label",
    "write_volume",
    "window_ct",
    "to_slices",
    "from_slices",
    "sliding_window_2d",
    "predict_volume",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "soft_tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
"""Common CT windows as ``(level, width)`` in Hounsfield units."""


def is_nifti_path(path: "str | Path") -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def case_name(path: "str | Path") -> str:
    """The case id of a NIfTI file: the name without ``.nii[.gz]`` and without a trailing
    ``_0000`` channel suffix (FLARE / nnU-Net: ``train_001_0000.nii.gz`` -> ``train_001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


@dataclass
class Volume:
    """A 3-D array with its affine and voxel spacing (mm), and where it came from."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    path: Optional[Path] = None
    header: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def name(self) -> str:
        return case_name(self.path) if self.path is not None else "volume"


def read_volume(path: "str | Path", dtype: Optional[Any] = None) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` volume with its affine and spacing.

    Raises ``MissingDataError`` for a missing file and ``DataFormatError`` (a ``ValueError``)
    for a file that is not NIfTI, not 3-D (a trailing axis of length 1 is dropped), or whose
    header has no valid voxel spacing (``pixdim`` zero, negative or not finite).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: NIfTI file not found")
    if not is_nifti_path(path):
        raise DataFormatError(f"{path}: not a NIfTI file name (expected a .nii or .nii.gz file)")
    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataFormatError(f"{path}: read as {type(image).__name__}, expected a NIfTI-1/2 image")
        data = np.asanyarray(image.dataobj)
    except DataFormatError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors...
        raise DataFormatError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataFormatError(f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    try:  # nibabel replaces a zero pixdim by 1 on load: read the header as stored
        from nibabel.openers import ImageOpener

        with ImageOpener(str(path)) as f:
            raw = type(image.header).from_fileobj(f, check=False)
        zooms = tuple(float(z) for z in np.asarray(raw["pixdim"])[1:4])
    except Exception as err:
        raise DataFormatError(f"{path}: cannot read the NIfTI header ({type(err).__name__}: {err})") from None
    if len(zooms) != 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise DataFormatError(
            f"{path}: the header has no valid voxel spacing (pixdim[1:4] = {list(zooms)}); expected three "
            f"positive sizes in mm"
        )
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return Volume(data=np.asarray(data), affine=np.asarray(image.affine, dtype=np.float64), spacing=zooms,
                  path=path, header=image.header)


def read_image_and_label(image_path: "str | Path", label_path: "str | Path") -> tuple[Volume, Volume]:
    """An image and its label volume, checked to share shape and spacing (to 1e-3 mm)."""
    image = read_volume(image_path)
    label = read_volume(label_path)
    if image.shape != label.shape:
        raise DataFormatError(
            f"{label_path}: label shape {label.shape} differs from image shape {image.shape} of {image_path}"
        )
    if not np.allclose(image.spacing, label.spacing, rtol=0, atol=1e-3):
        raise DataFormatError(
            f"{label_path}: label spacing {label.spacing} mm differs from image spacing {image.spacing} mm "
            f"of {image_path}"
        )
    data = label.data
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise DataFormatError(f"{label_path}: label volume holds non-integer values")
    if data.size and data.min() < 0:
        raise DataFormatError(f"{label_path}: label volume holds negative values (min {data.min()})")
    label.data = data.astype(np.int64, copy=False)
    return image, label


def write_volume(
    path: "str | Path",
    data: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
    dtype: Any = None,
) -> Path:
    """Write ``data`` as NIfTI with ``affine`` (and ``header`` fields such as the spacing and
    qform/sform codes when given), atomically: a temporary file in the same folder, then
    ``os.replace``. The file name must end in ``.nii`` or ``.nii.gz``."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"{path}: output name must end in .nii or .nii.gz")
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype == np.int64:  # NIfTI-1 readers (ITK, FLARE's evaluation) handle int64 poorly
        data = data.astype(np.int32) if data.size and data.max() > 255 else data.astype(np.uint8)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    new_header = header.copy() if header is not None else None
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=new_header)
    image.set_data_dtype(data.dtype)
    if header is not None:
        image.header.set_zooms(tuple(header.get_zooms()[: data.ndim]) + tuple(image.header.get_zooms()[data.ndim:]))
        image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:  # nibabel picks the format from the extension
        nib.save(image, str(tmp))
    return path


def window_ct(data: "np.ndarray | Tensor", level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Clip Hounsfield units to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``
    (float32). The default is the abdominal soft-tissue window (40, 400)."""
    if width <= 0:
        raise ValueError(f"width: expected a positive window width in HU, got {width}")
    lo = float(level) - float(width) / 2
    array = np.asarray(data, dtype=np.float32)
    return np.clip((array - lo) / float(width), 0.0, 1.0).astype(np.float32, copy=False)


def _check_axis(axis: int, ndim: int = 3) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= int(axis) < ndim:
        raise ValueError(f"axis: expected an integer in [-{ndim}, {ndim - 1}], got {axis!r}")
    return int(axis) % ndim


def to_slices(volume: np.ndarray, axis: int = 2) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(S, H, W)``: the 2-D slices along ``axis`` in index order (a view
    when possible). ``from_slices`` is its inverse."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume: expected a 3-D array, got shape {volume.shape}")
    return np.moveaxis(volume, _check_axis(axis), 0)


def from_slices(slices: np.ndarray, axis: int = 2) -> np.ndarray:
    """``(S, H, W)`` -> the volume with the slices stacked along ``axis`` (contiguous)."""
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"slices: expected (S, H, W), got shape {slices.shape}")
    return np.ascontiguousarray(np.moveaxis(slices, 0, _check_axis(axis)))


Predictor = Callable[[Tensor], Tensor]


def _window_starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window, step)) + [size - window]
    return sorted(set(starts))


def sliding_window_2d(
    predictor: Predictor,
    images: Tensor,
    window: "int | Sequence[int]",
    overlap: float = 0.25,
) -> Tensor:
    """Logits of ``images (B, C, H, W)`` predicted window by window and averaged where windows
    overlap (uniform weights), for slices larger than the model or the memory allows.

    ``predictor`` maps ``(B, C, h, w)`` to ``(B, L, h, w)``; windows larger than the image are
    clipped to it. The output is on the device of the predictor's logits, float32.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    wh, ww = (int(window), int(window)) if isinstance(window, (int, np.integer)) else (int(window[0]), int(window[1]))
    if wh < 1 or ww < 1:
        raise ValueError(f"window: expected positive sizes, got {window!r}")
    _, _, h, w = images.shape
    wh, ww = min(wh, h), min(ww, w)
    sh, sw = max(1, int(round(wh * (1 - overlap)))), max(1, int(round(ww * (1 - overlap))))
    out: Optional[Tensor] = None
    count: Optional[Tensor] = None
    for y in _window_starts(h, wh, sh):
        for x in _window_starts(w, ww, sw):
            logits = predictor(images[:, :, y : y + wh, x : x + ww]).float()
            if out is None:
                out = logits.new_zeros((images.shape[0], logits.shape[1], h, w))
                count = logits.new_zeros((1, 1, h, w))
            out[:, :, y : y + wh, x : x + ww] += logits
            count[:, :, y : y + wh, x : x + ww] += 1  # type: ignore[index]
    assert out is not None and count is not None
    return out / count


@torch.no_grad()
def predict_volume(
    predictor: Predictor,
    slices: np.ndarray,
    batch_size: Optional[int] = 16,
    device: "str | torch.device | None" = None,
    channels: int = 1,
    size: Optional[Sequence[int]] = None,
    window: Optional["int | Sequence[int]"] = None,
    overlap: float = 0.25,
    amp: bool = False,
) -> np.ndarray:
    """Label map ``(S, H, W)`` (int64 argmax of the logits) of preprocessed slices ``(S, H, W)``.

    Slices go through the predictor ``batch_size`` at a time (``None``: all at once, a plain
    full-resolution pass), each batch moved to ``device`` and back, so memory holds one batch
    of logits rather than the volume's. ``size`` resizes slices (bilinear) before prediction
    and the logits back (bilinear) after; ``window`` runs :func:`sliding_window_2d` in each
    slice; ``amp`` uses autocast (float16 on CUDA, bfloat16 on CPU).
    """
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim != 3:
        raise ValueError(f"slices: expected (S, H, W), got shape {slices.shape}")
    n, h, w = slices.shape
    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = np.zeros((n, h, w), dtype=np.int64)
    for start in range(0, n, max(step, 1)):
        batch = torch.from_numpy(slices[start : start + step]).to(device)[:, None]
        if channels > 1:
            batch = batch.expand(-1, channels, -1, -1)
        if size is not None:
            batch = torch.nn.functional.interpolate(batch, size=tuple(int(s) for s in size), mode="bilinear",
                                                    align_corners=False)
        with torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=amp):
            logits = sliding_window_2d(predictor, batch, window, overlap) if window is not None else predictor(batch)
        logits = logits.float()
        if logits.ndim != 4 or logits.shape[0] != batch.shape[0]:
            raise ValueError(
                f"predictor: expected logits (B, L+1, H, W) for a batch of {batch.shape[0]} slices, got "
                f"{tuple(logits.shape)}"
            )
        if logits.shape[-2:] != (h, w):
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out[start : start + step] = logits.argmax(1).cpu().numpy()
        del batch, logits
    return out
