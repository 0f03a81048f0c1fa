"""Image transforms: the one place where stored images become model tensors.

Every image source (MedIMeta datasets, in-memory arrays, 2-D segmentation sets, volume slices,
the L2L challenge CLI) converts its images here, so the same stored image gives the same tensor
whichever source reads it. The steps, in the order the official MedIMeta loader applies them:

1. channels: RGB -> grey with PIL's ``convert("L")`` integer formula (what the official loader
   does); grey -> RGB by repeating the plane;
2. resize: PIL bilinear with antialiasing on the uint8 image (torchvision's ``Resize`` on a PIL
   image), only when the stored size differs;
3. uint8 -> float32 in [0, 1] (``/ 255``), then normalisation by name (:data:`NORMALIZATIONS`).

:class:`ImageTransform` is a frozen, hashable description of these steps (channels, size,
normalisation) with batch methods that work on uint8 numpy batches without per-image copies.
Float images (CT slices windowed to [0, 1]) use :func:`normalize_` and :func:`resize_float`;
label maps use :func:`resize_masks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NORMALIZATIONS",
    "ImageTransform",
    "check_channels",
    "check_normalize",
    "parse_size",
    "normalization_stats",
    "normalization_spec",
    "read_image_file",
    "rgb_to_gray",
    "gray_to_rgb",
    "resize_uint8",
    "uint8_to_float",
    "normalize_",
    "resize_float",
    "resize_masks",
]

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "official": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
"""Mean and std per channel: the official loader's default (also timm's "inception" statistics of
SigLIP and many ViTs), ImageNet's (MedIMeta paper, DINOv2, ConvNeXt) and OpenAI CLIP's. Any other
statistics are written explicitly as ``"mean=R,G,B;std=R,G,B"`` (:func:`normalization_spec`)."""

SizeArg = Union[int, Sequence[int], None]

_CHUNK_BYTES = 1 << 18  # float conversion works on ~256 KiB chunks so its passes stay in the CPU cache
_UINT8_MAX = np.float32(255)


# -- arguments ---------------------------------------------------------------------------------
def check_channels(channels: Optional[int], where: str = "channels") -> Optional[int]:
    """``None``, 1 or 3 (as an ``int``); anything else raises ``ValueError`` naming ``where``."""
    if channels is None:
        return None
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"{where}: expected None, 1 or 3, got {channels!r}")
    return int(channels)


def check_normalize(normalize: Optional[str], where: str = "normalize") -> Optional[str]:
    """``None``, a key of :data:`NORMALIZATIONS` or an explicit ``"mean=R,G,B;std=R,G,B"``
    (:func:`normalization_spec`); anything else raises ``ValueError``."""
    if normalize is not None and normalize not in NORMALIZATIONS and _explicit_stats(normalize) is None:
        raise ValueError(
            f"{where}: expected None or one of {sorted(NORMALIZATIONS)} (or explicit statistics "
            f"'mean=R,G,B;std=R,G,B', std positive), got {normalize!r}"
        )
    return normalize


def normalization_spec(mean: Sequence[float], std: Sequence[float]) -> str:
    """The ``normalize`` value of explicit per-channel statistics (e.g. a timm model's
    ``pretrained_cfg`` mean/std): the :data:`NORMALIZATIONS` name when one matches, else
    ``"mean=R,G,B;std=R,G,B"``. A string, so an :class:`ImageTransform` stays hashable."""
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) != len(s) or not m or min(s) <= 0:
        raise ValueError(f"normalization_spec: expected equal-length mean and positive std, got {mean!r} / {std!r}")
    for name, (nm, ns) in NORMALIZATIONS.items():
        if len(nm) == len(m) and all(abs(a - b) < 1e-6 for a, b in zip(nm + ns, m + s)):
            return name
    return f"mean={','.join(repr(v) for v in m)};std={','.join(repr(v) for v in s)}"


@lru_cache(maxsize=64)
def _explicit_stats(normalize: str) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """``(mean, std)`` of a ``"mean=...;std=..."`` string, ``None`` when it is not one."""
    parts = dict(p.split("=", 1) for p in str(normalize).replace(" ", "").split(";") if "=" in p)
    if set(parts) != {"mean", "std"} or str(normalize).count(";") != 1:
        return None
    try:
        mean = tuple(float(v) for v in parts["mean"].split(","))
        std = tuple(float(v) for v in parts["std"].split(","))
    except ValueError:
        return None
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        return None
    return mean, std


def parse_size(image_size: SizeArg, default: Optional[Sequence[int]] = None) -> Optional[tuple[int, int]]:
    """``(H, W)`` of an int (square) or a pair; ``None`` gives ``default`` (which may be ``None``)."""
    if image_size is None:
        return None if default is None else (int(default[0]), int(default[1]))
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size: expected an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size: expected positive sizes, got {image_size!r}")
    return size


def normalization_stats(normalize: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of a named normalisation for ``channels`` channels: the table's
    three values for RGB, its first value (repeated) for any other channel count."""
    mean, std = NORMALIZATIONS.get(check_normalize(normalize) or "") or _explicit_stats(normalize) or ((), ())
    if channels == len(mean):
        return tuple(mean), tuple(std)
    return (mean[0],) * channels, (std[0],) * channels


# -- uint8 images ------------------------------------------------------------------------------
def read_image_file(path: "str | Path", channels: int, where: str = "image") -> np.ndarray:
    """An image file (PNG, JPEG, TIFF, ...) as stored: uint8 ``(H, W)`` for grey (``L``) files,
    ``(H, W, 3)`` for RGB ones; files in other modes (palette, alpha, 16-bit, ...) are decoded by
    PIL's ``convert`` to ``channels`` (1: ``L``, 3: ``RGB``). Channel conversion and resizing of
    the result are :class:`ImageTransform`'s. Raises ``MissingDataError`` / ``DataFormatError``
    naming ``where`` and the file."""
    from PIL import Image, UnidentifiedImageError

    from medmeta.errors import DataFormatError, MissingDataError

    try:
        with Image.open(path) as image:
            if image.mode in ("L", "RGB"):
                return np.asarray(image, dtype=np.uint8)
            return np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise MissingDataError(f"{where}: image file {path} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"{where}: {path} cannot be read as an image ({err})") from None


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 3)`` RGB -> ``(...)`` luma, bit-identical to PIL's ``Image.convert("L")``.

    PIL computes ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (ITU-R 601-2 weights in 16-bit
    fixed point); checked against PIL on all 2**24 colours. Works on single images and batches.
    """
    x = rgb.astype(np.uint32)
    gray = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return gray.astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 ``(...)`` grey -> ``(..., 3)`` by repeating the plane (PIL's ``convert("RGB")``)."""
    return np.repeat(gray[..., None], 3, axis=-1)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 ``(H, W)`` or ``(H, W, 3)`` image to ``size = (H', W')`` exactly as
    torchvision's ``Resize`` does on a PIL image (PIL bilinear with antialiasing)."""
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def uint8_to_float(images: Tensor, normalize: Optional[str], out: Optional[Tensor] = None) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``/ 255`` then normalised, the official loader's float32
    operations (written into ``out`` when given, which must have the same shape)."""
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32)
    out.copy_(images)  # uint8 -> float32, exact
    out.div_(255)
    if normalize is not None:
        normalize_(out, normalize)
    return out


# -- float images and masks --------------------------------------------------------------------
def normalize_(images: Tensor, normalize: str) -> Tensor:
    """Normalise float ``(N, C, H, W)`` images in [0, 1] in place (``- mean``, ``/ std``)."""
    mean, std = _stats_tensors(normalize, int(images.shape[1]), images.dtype, images.device)
    return images.sub_(mean).div_(std)


@lru_cache(maxsize=32)
def _stats_tensors(normalize: str, channels: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``(1, C, 1, 1)`` tensors, built once (batches convert chunk by chunk)."""
    mean, std = normalization_stats(normalize, channels)
    shape = (1, channels, 1, 1)
    return (
        torch.tensor(mean, dtype=dtype, device=device).view(shape),
        torch.tensor(std, dtype=dtype, device=device).view(shape),
    )


@lru_cache(maxsize=32)
def _stats_arrays(normalize: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` as float32 ``(1, C, 1, 1)`` arrays (the float32 values torch uses)."""
    mean, std = normalization_stats(normalize, channels)
    shape = (1, channels, 1, 1)
    m, s = np.asarray(mean, dtype=np.float32).reshape(shape), np.asarray(std, dtype=np.float32).reshape(shape)
    m.flags.writeable = s.flags.writeable = False
    return m, s


def resize_float(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of float ``(N, C, H, W)`` images (e.g. CT slices), unchanged at ``size``."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of integer label maps ``(N, H, W)`` (int64 out), unchanged at ``size``."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()


# -- the pipeline ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """What a source does to its stored uint8 images (see module doc); hashable, so it also
    names an image pipeline (e.g. in a cache key).

    Args:
        channels: output channels, 1 or 3.
        size: output ``(H, W)``; ``None`` keeps the stored size.
        normalize: a key of :data:`NORMALIZATIONS` or ``"mean=R,G,B;std=R,G,B"``, or ``None``
            for values in [0, 1].
    """

    channels: int
    size: Optional[tuple[int, int]] = None
    normalize: Optional[str] = "official"

    def __post_init__(self) -> None:
        if check_channels(self.channels) is None:
            raise ValueError("channels: expected 1 or 3, got None")
        object.__setattr__(self, "size", parse_size(self.size))
        check_normalize(self.normalize)

    def image(self, image: np.ndarray) -> np.ndarray:
        """One uint8 ``(H, W)`` or ``(H, W, 3)`` image, channel-reduced and resized (still
        uint8; a grey image stays ``(H, W)`` and is repeated to RGB by the float step)."""
        if image.ndim == 3 and self.channels == 1:
            image = rgb_to_gray(image)
        return image if self.size is None else resize_uint8(image, self.size)

    def __call__(self, images: np.ndarray) -> Tensor:
        """A uint8 batch ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, C, H', W')``."""
        images = np.asarray(images)
        return self.rows(lambda sel: images[sel], len(images), tuple(images.shape[1:]))

    def rows(
        self,
        fetch: Callable[[slice], np.ndarray],
        n: int,
        stored: Sequence[int],
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """``n`` uint8 rows of shape ``stored`` (``(H, W)`` or ``(H, W, 3)``), fetched chunk by
        chunk as ``fetch(slice)`` (a memory map gathers only those rows), -> ``(n, C, H', W')``
        float32, written into ``out`` when given (see :meth:`output_buffer`).

        Chunks of about 256 KiB of output keep the float passes in the CPU cache; rows that need
        resizing go through :meth:`image` one by one (PIL works per image). The float step is
        three single-threaded numpy passes per chunk (no torch thread pool to wake per chunk).
        """
        stored = tuple(int(v) for v in stored)
        h, w = self.size if self.size is not None else (stored[0], stored[1])
        resize = self.size is not None and stored[:2] != self.size
        want = self.channels
        out = self.output_buffer(n, (h, w), out)
        dst = out.numpy()
        step = max(1, _CHUNK_BYTES // (want * h * w * 4))
        for i in range(0, n, step):
            j = min(n, i + step)
            rows = fetch(slice(i, j))
            if resize:
                rows = np.stack([self.image(r) for r in rows])
            elif rows.ndim == 4 and want == 1:
                rows = rgb_to_gray(rows)
            self._to_float(rows, dst[i:j])
        return out

    def output_buffer(self, n: int, size: tuple[int, int], out: Optional[Tensor] = None) -> Tensor:
        """``out`` checked to be a contiguous CPU float32 ``(n, C, H, W)`` tensor, or a new one.

        Reusing one buffer across batches saves more than the conversion costs at 224 px: a fresh
        38 MiB batch (64 RGB images) is paged in by the kernel on first write, about 0.3 ms per
        image here. Raises ``ValueError`` naming ``out`` when it does not fit.
        """
        shape = (int(n), self.channels, int(size[0]), int(size[1]))
        if out is None:
            return torch.empty(shape, dtype=torch.float32)
        if not isinstance(out, Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(
                f"out: expected a contiguous CPU float32 tensor of shape {shape}, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
            )
        return out

    def images(self, images: Sequence[np.ndarray]) -> Tensor:
        """Single uint8 images of any stored size and channels (e.g. TIFF files) -> one float32
        batch; needs ``size`` unless they all have the same size."""
        prepared = [self.image(np.asarray(img)) for img in images]
        if len({p.ndim for p in prepared}) > 1:  # mixed grey and RGB (only when RGB is wanted)
            prepared = [p if p.ndim == 3 else gray_to_rgb(p) for p in prepared]
        if not prepared:
            if self.size is None:
                raise ValueError("ImageTransform.images: no images and no size")
            return torch.empty((0, self.channels, *self.size), dtype=torch.float32)
        if len({p.shape for p in prepared}) > 1:
            raise ValueError(f"images: different sizes {sorted({p.shape for p in prepared})[:4]}; set a size")
        return self(np.stack(prepared))

    def _to_float(self, rows: np.ndarray, out: np.ndarray) -> None:
        """uint8 ``(k, H, W)`` or ``(k, H, W, 3)`` -> ``out`` float32 ``(k, C, H, W)`` in place:
        ``/ 255``, ``- mean``, ``/ std`` in float32 (IEEE-exact like torchvision's ``ToTensor`` +
        ``Normalize``, so the same bits). RGB rows are transposed to planes in uint8 first (a
        quarter of the bytes of a float transpose); grey rows broadcast to every channel."""
        if rows.ndim == 4:
            planes = np.ascontiguousarray(rows.transpose(0, 3, 1, 2))
            if planes.shape[1] != out.shape[1]:  # pragma: no cover - RGB -> grey happens before
                raise ValueError(f"rows: {planes.shape[1]} channels, expected {out.shape[1]}")
        else:
            planes = rows[:, None]
        np.divide(planes, _UINT8_MAX, out=out, dtype=np.float32)
        if self.normalize is not None:
            mean, std = _stats_arrays(self.normalize, int(out.shape[1]))
            np.subtract(out, mean, out=out)
            np.divide(out, std, out=out)
