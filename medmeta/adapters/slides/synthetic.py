"""Seeded synthetic whole-slide images, written as real pyramidal TIFFs with tifffile.

:func:`write_pyramidal_tiff` writes any RGB image as a tiled pyramid in one of three layouts that
real slides use, each a separate reader path:

* ``"pages"``: every level a top-level page (``NewSubfileType`` reduced for levels > 0), as in
  the VisioMel pyramidal TIFFs; OpenSlide reads it as ``generic-tiff``.
* ``"subifd"``: levels > 0 in sub-IFDs of the first page (OME-TIFF style); OpenSlide and cuCIM
  see one level, the tifffile backend sees all.
* ``"aperio"``: an Aperio ``ImageDescription`` (``AppMag``, ``MPP``) and a stripped thumbnail as
  page 1 before the other levels, so "page k is level k" is wrong; OpenSlide reports vendor
  ``aperio``.

JPEG tiles are written from RGB input as YCbCr with 2x2 chroma subsampling, like scanners do
(needs ``imagecodecs``). :func:`make_synthetic_slide` draws tissue-like blobs (pink stroma with
purple nuclei) on a white glass background and returns the truth (tissue mask, blob boxes,
pattern boxes), optionally with a "lesion" pattern (dense dark nuclei clusters) so that slide
labels can depend on a small part of the tissue, as in MIL problems.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from medmeta.io import atomic_path

__all__ = [
    "write_pyramidal_tiff",
    "make_synthetic_slide",
    "SyntheticSlide",
    "pyramid_levels",
    "halve",
    "LAYOUTS",
]

LAYOUTS = ("pages", "subifd", "aperio")
_COMPRESSIONS = {"jpeg": "jpeg", "zlib": "zlib", "none": None}

_BACKGROUND = np.array([244, 243, 246], dtype=np.float32)
_STROMA = np.array([226, 158, 196], dtype=np.float32)
_NUCLEUS = np.array([112, 72, 158], dtype=np.float32)
_LESION_NUCLEUS = np.array([58, 40, 118], dtype=np.float32)


def halve(a: np.ndarray) -> np.ndarray:
    """2x2 area mean of an ``(H, W, C)`` uint8 image (odd last row / column dropped)."""
    h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
    if h == 0 or w == 0:
        raise ValueError(f"cannot halve an image of shape {a.shape}")
    s = a[0:h:2, 0:w:2].astype(np.uint16)
    s += a[1:h:2, 0:w:2]
    s += a[0:h:2, 1:w:2]
    s += a[1:h:2, 1:w:2]
    s += 2
    s //= 4
    return s.astype(np.uint8)


def pyramid_levels(image: np.ndarray, tile: int = 256, levels: Optional[int] = None) -> list[np.ndarray]:
    """Level 0 and its successive 2x reductions; by default until a level fits in one tile."""
    out = [image]
    while (levels is None and max(out[-1].shape[:2]) > tile and min(out[-1].shape[:2]) >= 2) or (
        levels is not None and len(out) < levels
    ):
        out.append(halve(out[-1]))
    return out


def write_pyramidal_tiff(
    path: "str | Path",
    image_level0: np.ndarray,
    mpp: float = 0.5,
    tile: int = 256,
    levels: Optional[int] = None,
    compression: str = "jpeg",
    layout: str = "pages",
    quality: int = 90,
    magnification: Optional[float] = None,
) -> Path:
    """Write ``image_level0`` (``(H, W, 3)`` uint8) as a tiled pyramidal TIFF; atomic.

    Args:
        mpp: level-0 microns per pixel (stored as resolution in pixels per centimetre per level,
            and in the Aperio description for ``layout="aperio"``).
        tile: tile edge in pixels (a multiple of 16, as TIFF requires).
        levels: number of levels (default: halve until a level fits in one tile).
        compression: ``"jpeg"`` (YCbCr 4:2:0, ``quality``), ``"zlib"`` (lossless) or ``"none"``.
        layout: ``"pages"``, ``"subifd"`` or ``"aperio"`` (see the module doc).
        magnification: objective power written as Aperio ``AppMag`` (default ``10 / mpp``).
    """
    import tifffile

    path = Path(path)
    image = np.asarray(image_level0)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_level0: expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression: expected one of {sorted(_COMPRESSIONS)}, got {compression!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile: must be a positive multiple of 16 (TIFF tiles), got {tile}")
    if not mpp > 0:
        raise ValueError(f"mpp: must be positive, got {mpp}")
    if levels is not None and levels < 1:
        raise ValueError(f"levels: must be at least 1, got {levels}")
    pyramid = pyramid_levels(image, tile, levels)
    h0, w0 = image.shape[:2]
    codec = _COMPRESSIONS[compression]
    kwargs: dict = {"photometric": "rgb", "compression": codec, "metadata": None}
    if codec == "jpeg":
        kwargs["compressionargs"] = {"level": int(quality)}
    elif codec == "zlib":
        kwargs["compressionargs"] = {"level": 6}
    mag = float(magnification) if magnification is not None else round(10.0 / mpp, 2)

    def resolution(k: int) -> dict:
        ds = (w0 / pyramid[k].shape[1] + h0 / pyramid[k].shape[0]) / 2
        per_cm = 1e4 / (mpp * ds)
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    def aperio_description(k: int) -> str:
        head = "Aperio Image Library v10.0.51\r\n"
        tail = f"|AppMag = {mag:g}|MPP = {mpp:.6g}|Filename = medmeta-synthetic"
        if k == 0:
            codec_name = "JPEG/RGB Q=%d" % quality if codec == "jpeg" else "ZLIB/RGB"
            return f"{head}{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) {codec_name}{tail}"
        hk, wk = pyramid[k].shape[:2] if k >= 0 else (0, 0)
        return f"{head}{w0}x{h0} -> {wk}x{hk} - {tail}"

    bigtiff = sum(a.nbytes for a in pyramid) > 3 * 2**30
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            if layout == "pages":
                for k, level in enumerate(pyramid):
                    tw.write(level, tile=(tile, tile), subfiletype=1 if k else 0, **resolution(k), **kwargs)
            elif layout == "subifd":
                tw.write(pyramid[0], tile=(tile, tile), subifds=len(pyramid) - 1, **resolution(0), **kwargs)
                for k in range(1, len(pyramid)):
                    tw.write(pyramid[k], tile=(tile, tile), subfiletype=1, **resolution(k), **kwargs)
            else:  # aperio: level 0, stripped thumbnail, then the other levels
                tw.write(pyramid[0], tile=(tile, tile), description=aperio_description(0), **kwargs)
                thumb = pyramid[-1]
                while max(thumb.shape[:2]) > 1024:
                    thumb = halve(thumb)
                th_desc = f"Aperio Image Library v10.0.51\r\n{w0}x{h0} -> {thumb.shape[1]}x{thumb.shape[0]} - "
                tw.write(thumb, rowsperstrip=thumb.shape[0], description=th_desc, **kwargs)
                for k in range(1, len(pyramid)):
                    tw.write(pyramid[k], tile=(tile, tile), description=aperio_description(k), **kwargs)
    return path


@dataclass
class SyntheticSlide:
    """A written synthetic slide and its truth (all geometry in level-0 pixels)."""

    path: Path
    size: tuple[int, int]  # (width, height)
    mpp: float
    tile: int
    n_levels: int
    layout: str
    compression: str
    tissue_mask: np.ndarray  # (H, W) bool, True on tissue
    blob_boxes: list[tuple[int, int, int, int]]  # (x, y, w, h) per blob
    pattern: Optional[str] = None
    pattern_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    pattern_mask: Optional[np.ndarray] = None  # (H, W) bool where the pattern was drawn
    image: Optional[np.ndarray] = None  # level-0 pixels when keep_image=True

    @property
    def tissue_fraction(self) -> float:
        return float(self.tissue_mask.mean())


def _disc_offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    keep = xx**2 + yy**2 <= radius**2 + radius * 0.5
    return np.stack([yy[keep], xx[keep]], axis=1)


def _stamp(label: np.ndarray, centres: np.ndarray, radius: int, value: int) -> None:
    if len(centres) == 0:
        return
    offsets = _disc_offsets(radius)
    pts = centres[:, None, :] + offsets[None]
    h, w = label.shape
    ys = np.clip(pts[..., 0], 0, h - 1).ravel()
    xs = np.clip(pts[..., 1], 0, w - 1).ravel()
    label[ys, xs] = value


def make_synthetic_slide(
    path: "str | Path",
    size: Sequence[int] = (2048, 2048),
    seed: int = 0,
    blobs: int = 3,
    pattern: Optional[str] = None,
    mpp: float = 0.5,
    layout: str = "pages",
    compression: str = "jpeg",
    tile: int = 256,
    levels: Optional[int] = None,
    quality: int = 90,
    lesions: int = 3,
    lesion_radius: float = 0.05,
    keep_image: bool = False,
    magnification: Optional[float] = None,
) -> SyntheticSlide:
    """Draw and write a seeded synthetic H&E-like slide; return its truth.

    Args:
        size: level-0 ``(width, height)``.
        blobs: number of tissue blobs (irregular ellipses of stroma with nuclei); 0 gives an
            empty glass slide (for no-tissue errors).
        pattern: ``None`` or ``"lesions"``: ``lesions`` discs of radius ``lesion_radius`` times
            the short side, inside the tissue, packed with dark nuclei (a label-dependent motif
            for MIL tests: draw it on the positive slides only).
        layout, compression, tile, levels, quality, mpp: see :func:`write_pyramidal_tiff`.
    """
    if pattern not in (None, "lesions"):
        raise ValueError(f"pattern: expected None or 'lesions', got {pattern!r}")
    w, h = (int(v) for v in size)
    if w < 64 or h < 64:
        raise ValueError(f"size: a synthetic slide needs at least 64x64 pixels, got {(w, h)}")
    if blobs < 0:
        raise ValueError(f"blobs: must be >= 0, got {blobs}")
    rng = np.random.default_rng(seed)
    f = 4  # the tissue and lesion shapes are drawn at 1/4 and repeated (their exact truth)
    hs, ws = -(-h // f), -(-w // f)
    ys, xs = np.mgrid[0:hs, 0:ws].astype(np.float32)
    mask_s = np.zeros((hs, ws), dtype=bool)
    boxes: list[tuple[int, int, int, int]] = []
    short = min(ws, hs)
    for _ in range(blobs):
        rx, ry = rng.uniform(0.10, 0.22, size=2) * short
        cx = rng.uniform(rx * 1.3, ws - rx * 1.3) if ws > 2.6 * rx else ws / 2
        cy = rng.uniform(ry * 1.3, hs - ry * 1.3) if hs > 2.6 * ry else hs / 2
        x0, x1 = int(max(0, cx - 1.5 * rx)), int(min(ws, cx + 1.5 * rx + 1))
        y0, y1 = int(max(0, cy - 1.5 * ry)), int(min(hs, cy + 1.5 * ry + 1))
        dx, dy = (xs[y0:y1, x0:x1] - cx) / rx, (ys[y0:y1, x0:x1] - cy) / ry
        theta = np.arctan2(dy, dx)
        radius = np.ones_like(theta)
        for k in range(2, 6):
            radius += rng.uniform(0.02, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        inside = np.hypot(dx, dy) <= radius
        if not inside.any():
            continue
        mask_s[y0:y1, x0:x1] |= inside
        iy, ix = np.nonzero(inside)
        bx0, by0 = (x0 + ix.min()) * f, (y0 + iy.min()) * f
        bx1, by1 = min(w, (x0 + ix.max() + 1) * f), min(h, (y0 + iy.max() + 1) * f)
        boxes.append((int(bx0), int(by0), int(bx1 - bx0), int(by1 - by0)))
    lesion_s = np.zeros_like(mask_s)
    pattern_boxes: list[tuple[int, int, int, int]] = []
    if pattern == "lesions" and mask_s.any():
        cand_y, cand_x = np.nonzero(mask_s)
        rr = max(2.0, lesion_radius * short)
        for _ in range(lesions):
            i = rng.integers(len(cand_y))
            cy, cx = float(cand_y[i]), float(cand_x[i])
            x0, x1 = int(max(0, cx - rr)), int(min(ws, cx + rr + 1))
            y0, y1 = int(max(0, cy - rr)), int(min(hs, cy + rr + 1))
            disc = (xs[y0:y1, x0:x1] - cx) ** 2 + (ys[y0:y1, x0:x1] - cy) ** 2 <= rr**2
            disc &= mask_s[y0:y1, x0:x1]
            lesion_s[y0:y1, x0:x1] |= disc
            iy, ix = np.nonzero(disc)
            if len(iy):
                bx0, by0 = (x0 + ix.min()) * f, (y0 + iy.min()) * f
                bx1, by1 = min(w, (x0 + ix.max() + 1) * f), min(h, (y0 + iy.max() + 1) * f)
                pattern_boxes.append((int(bx0), int(by0), int(bx1 - bx0), int(by1 - by0)))
    del xs, ys
    mask = np.repeat(np.repeat(mask_s, f, axis=0), f, axis=1)[:h, :w]
    lesion = np.repeat(np.repeat(lesion_s, f, axis=0), f, axis=1)[:h, :w] if pattern else None

    # Nuclei: 0 none, 1 ordinary, 2 lesion nucleus (stamped discs at full resolution).
    nuclei = np.zeros((h, w), dtype=np.uint8)
    n_normal = int(w * h / 900)
    pts = np.stack([rng.integers(0, h, n_normal), rng.integers(0, w, n_normal)], axis=1)
    pts = pts[mask[pts[:, 0], pts[:, 1]]]
    _stamp(nuclei, pts, 3, 1)
    if lesion is not None and lesion.any():
        n_lesion = int(lesion.sum() / 60)
        ly, lx = np.nonzero(lesion_s)
        pick = rng.integers(0, len(ly), n_lesion)
        pts = np.stack([ly[pick] * f + rng.integers(0, f, n_lesion), lx[pick] * f + rng.integers(0, f, n_lesion)], axis=1)
        pts[:, 0] = np.minimum(pts[:, 0], h - 1)
        pts[:, 1] = np.minimum(pts[:, 1], w - 1)
        _stamp(nuclei, pts, 4, 2)
        nuclei[~mask] = 0

    # Stain intensity varies slowly across the tissue (a coarse field repeated per band).
    g = 64
    field_s = rng.uniform(0.85, 1.1, size=(-(-h // g) + 1, -(-w // g) + 1)).astype(np.float32)
    image = np.empty((h, w, 3), dtype=np.uint8)
    band = 256
    cols = np.arange(w) // g
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        m = mask[y0:y1]
        nu = nuclei[y0:y1]
        fld = field_s[np.arange(y0, y1) // g][:, cols]
        px = np.empty((y1 - y0, w, 3), dtype=np.float32)
        px[:] = _BACKGROUND
        stroma = 255.0 - (255.0 - _STROMA) * fld[..., None]
        px[m] = stroma[m]
        px[nu == 1] = _NUCLEUS
        px[nu == 2] = _LESION_NUCLEUS
        noise = rng.standard_normal((y1 - y0, w, 1), dtype=np.float32)
        noise *= np.where(m, 7.0, 2.0)[..., None].astype(np.float32)
        px += noise
        np.clip(px, 0, 255, out=px)
        image[y0:y1] = px.astype(np.uint8)
    write_pyramidal_tiff(
        path, image, mpp=mpp, tile=tile, levels=levels, compression=compression, layout=layout,
        quality=quality, magnification=magnification,
    )
    n_levels = int(levels) if levels else _count_levels(w, h, tile)
    return SyntheticSlide(
        path=Path(path), size=(w, h), mpp=float(mpp), tile=int(tile), n_levels=n_levels, layout=layout,
        compression=compression, tissue_mask=mask, blob_boxes=boxes, pattern=pattern,
        pattern_boxes=pattern_boxes, pattern_mask=lesion, image=image if keep_image else None,
    )


def _count_levels(w: int, h: int, tile: int) -> int:
    n = 1
    while max(w, h) > tile and min(w, h) >= 2:
        w, h = w // 2, h // 2
        n += 1
    return n
