"""Tissue detection at low resolution, and a mask that answers "how much tissue is in this tile".

The common recipe (CLAM and its descendants): HSV saturation of a low-resolution level, a median
blur (kernel 7), a threshold (Otsu by default, never below a floor so an empty glass slide
finds nothing instead of its noise), morphological closing, removal of small objects and
filling of holes. ``method="otsu"`` thresholds darkness (255 minus grey level) instead, which
suits pale stains with little saturation.

:class:`TissueMask` keeps the mask with its downsample and computes the exact area-weighted
tissue fraction of any level-0 rectangle from a summed-area table, vectorised over tiles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from medmeta.adapters.slides.backends.base import SlideReader
from medmeta.data.transforms import rgb_to_gray
from medmeta.io import atomic_path

__all__ = ["TissueMask", "detect_tissue", "otsu_threshold"]

#: Lowest thresholds Otsu may return (0..255 scale): below these an image is glass and noise.
MIN_THRESHOLDS = {"saturation": 8.0, "otsu": 12.0}


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-range values (between-class variance maximised on 256 bins)."""
    hist = np.bincount(np.clip(values.ravel(), 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1
    # Threshold t separates values <= t from values > t.
    return float(np.argmax(between))


@dataclass
class TissueMask:
    """A boolean tissue mask of a slide at a known downsample.

    Attributes:
        mask: ``(h, w)`` bool, True on tissue.
        downsample: level-0 pixels per mask pixel ``(x, y)``.
        slide_dimensions: level-0 ``(width, height)`` of the slide.
        threshold: the threshold used (on the 0..255 scale of the method's channel).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    slide_dimensions: tuple[int, int]
    method: str = "saturation"
    threshold: float = float("nan")

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self._sat: Optional[np.ndarray] = None

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def _table(self) -> np.ndarray:
        if self._sat is None:
            sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.float64)
            sat[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1)
            self._sat = sat
        return self._sat

    def _integral(self, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
        """Area of tissue in ``[0, mx) x [0, my)`` (mask pixels, fractional bounds): the summed-area
        table interpolated bilinearly, which is exact for a piecewise-constant mask."""
        sat = self._table()
        h, w = self.mask.shape
        mx = np.clip(mx, 0.0, w)
        my = np.clip(my, 0.0, h)
        x0 = np.minimum(np.floor(mx).astype(np.int64), w - 1) if w else np.zeros_like(mx, dtype=np.int64)
        y0 = np.minimum(np.floor(my).astype(np.int64), h - 1) if h else np.zeros_like(my, dtype=np.int64)
        fx, fy = mx - x0, my - y0
        s00, s01 = sat[y0, x0], sat[y0, x0 + 1]
        s10, s11 = sat[y0 + 1, x0], sat[y0 + 1, x0 + 1]
        return s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy

    def fractions(self, coords: np.ndarray, width: float, height: Optional[float] = None) -> np.ndarray:
        """Tissue fraction of each level-0 rectangle ``(x, y, width, height)``, ``coords`` (N, 2).

        Area outside the slide counts as non-tissue.
        """
        height = width if height is None else height
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if width <= 0 or height <= 0:
            raise ValueError(f"tissue fraction: rectangle size must be positive, got ({width}, {height})")
        dx, dy = self.downsample
        x0, y0 = coords[:, 0] / dx, coords[:, 1] / dy
        x1, y1 = (coords[:, 0] + width) / dx, (coords[:, 1] + height) / dy
        area = (
            self._integral(x1, y1) - self._integral(x0, y1) - self._integral(x1, y0) + self._integral(x0, y0)
        )
        return np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction of one level-0 rectangle."""
        return float(self.fractions(np.array([[x, y]]), w, h)[0])

    def save(self, path: "str | Path") -> Path:
        """Write the mask as a PNG (0 / 255), downsample and slide size in its text chunk; atomic."""
        from PIL.PngImagePlugin import PngInfo

        path = Path(path)
        info = PngInfo()
        info.add_text(
            "medmeta.tissue",
            json.dumps(
                {
                    "downsample": list(self.downsample),
                    "slide_dimensions": list(self.slide_dimensions),
                    "method": self.method,
                    "threshold": self.threshold,
                }
            ),
        )
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=info)
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "TissueMask":
        """Read a mask written by :meth:`save`."""
        path = Path(path)
        with Image.open(path) as img:
            meta = img.info.get("medmeta.tissue")
            mask = np.asarray(img.convert("L")) > 127
        if meta is None:
            raise ValueError(f"tissue mask {path}: no 'medmeta.tissue' metadata; was it written by TissueMask.save?")
        m = json.loads(meta)
        return cls(
            mask=mask,
            downsample=tuple(m["downsample"]),
            slide_dimensions=tuple(m["slide_dimensions"]),
            method=m.get("method", ""),
            threshold=float(m.get("threshold", float("nan"))),
        )

    def to_image(self, scale: int = 1) -> np.ndarray:
        """The mask as a uint8 image (0 / 255), enlarged ``scale`` times (for reports)."""
        img = self.mask.astype(np.uint8) * 255
        return np.repeat(np.repeat(img, scale, 0), scale, 1) if scale > 1 else img


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def detect_tissue(
    slide: SlideReader,
    level: Optional[int] = None,
    method: str = "saturation",
    threshold: Optional[float] = None,
    median_kernel: int = 7,
    min_object_area: float = 0.0,
    fill_holes: "bool | float" = True,
    closing_radius: int = 2,
    downsample: float = 32.0,
    min_mask_side: int = 512,
    max_mask_pixels: int = 4_000_000,
) -> TissueMask:
    """Find tissue on a low-resolution view of ``slide``.

    Args:
        level: pyramid level to threshold; ``None`` works at ``downsample`` (32, as CLAM), made
            finer for small slides so the mask's long side is at least ``min_mask_side`` and
            coarser if it would exceed ``max_mask_pixels``: the nearest stored level when it
            is close to that downsample, else a thumbnail reduced from the next finer level.
        method: ``"saturation"`` (HSV saturation, max minus min over max) or ``"otsu"``
            (darkness, 255 minus the grey level).
        threshold: on the 0..255 scale of the method's channel; ``None`` uses Otsu's threshold,
            raised to at least 8 (saturation) / 12 (darkness) so glass is never tissue.
        median_kernel: median blur size before thresholding (odd; 1 disables it).
        min_object_area: connected tissue pieces smaller than this (level-0 pixels squared)
            are dropped (dust, debris).
        fill_holes: ``True`` fills every enclosed hole; a number fills holes smaller than that
            area (level-0 pixels squared); ``False`` keeps holes.
        closing_radius: radius in mask pixels of the morphological closing (0 disables it).
    """
    if method not in ("saturation", "otsu"):
        raise ValueError(f"detect_tissue: method must be 'saturation' or 'otsu', got {method!r}")
    if median_kernel < 1 or median_kernel % 2 == 0:
        raise ValueError(f"detect_tissue: median_kernel must be a positive odd int, got {median_kernel}")
    w0, h0 = slide.dimensions
    if level is None:
        # Small slides get a finer mask (long side >= min_mask_side), big ones stay bounded.
        ds = max(1.0, min(float(downsample), max(w0, h0) / float(min_mask_side)))
        ds = max(ds, (w0 * h0 / float(max_mask_pixels)) ** 0.5)
        level = slide.best_level_for_downsample(ds)
        if slide.level_downsamples[level] * 1.5 < ds:  # the nearest level is much finer: reduce it
            rgb = slide.get_thumbnail((max(1, round(w0 / ds)), max(1, round(h0 / ds))))
        else:
            rgb = slide.read_level(level)
    else:
        level = slide._check_level(level)
        rgb = slide.read_level(level)
    h, w = rgb.shape[:2]
    scale = (w0 / w, h0 / h)  # level-0 pixels per mask pixel, x and y
    if method == "saturation":
        rgb_f = rgb.astype(np.float32)
        mx, mn = rgb_f.max(axis=2), rgb_f.min(axis=2)
        channel = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6) * 255.0, 0.0).astype(np.uint8)
    else:
        channel = 255 - rgb_to_gray(rgb)  # darkness, from the one RGB -> grey conversion
    if median_kernel > 1:
        channel = ndimage.median_filter(channel, size=median_kernel, mode="nearest")
    if threshold is None:
        thr = max(otsu_threshold(channel), MIN_THRESHOLDS[method])
    else:
        thr = float(threshold)
    mask = channel > thr
    if closing_radius > 0 and mask.any():
        mask = ndimage.binary_closing(mask, structure=_disk(closing_radius), border_value=0)
    px_area = scale[0] * scale[1]
    if min_object_area > 0 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_object_area
        keep[0] = False
        mask = keep[labels]
    if fill_holes is not False and mask.any():
        filled = ndimage.binary_fill_holes(mask)
        if fill_holes is True:
            mask = filled
        else:
            holes, n = ndimage.label(filled & ~mask)
            sizes = np.bincount(holes.ravel(), minlength=n + 1) * px_area
            small = sizes < float(fill_holes)
            small[0] = False
            mask = mask | small[holes]
    return TissueMask(mask=mask, downsample=scale, slide_dimensions=(w0, h0), method=method, threshold=thr)
