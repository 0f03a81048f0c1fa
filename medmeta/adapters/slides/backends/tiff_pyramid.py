"""Find the pyramid inside a TIFF file: which pages (or sub-IFDs) are the levels, and the scale.

Shared by the tifffile backend (which decodes the stored tiles itself) and the pyvips backend
(which needs to know which page or sub-IFD to load for each level). The rules:

* Level candidates are the tiled top-level pages and the tiled sub-IFDs of the first page, so
  pyramids stored in sub-IFDs (OME-TIFF and tifffile ``subifds=``) are seen as levels, which
  OpenSlide and cuCIM do not do.
* Level 0 is the largest candidate; other levels are smaller candidates with the same pixel
  type and the same aspect ratio (within rounding). Masks (``NewSubfileType`` bit 4) are skipped.
* Aperio SVS: page 1 is a stripped thumbnail and is never a level, whatever its size, and the
  ``label`` / ``macro`` pages are skipped; microns per pixel and objective power come from the
  ``ImageDescription`` (``MPP = 0.499|AppMag = 20``).
* Otherwise microns per pixel come from OME-XML ``PhysicalSizeX/Y`` or the TIFF resolution tags
  (centimetre or inch units; a unitless resolution is ignored).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from medmeta.adapters.slides.errors import (
    NotPyramidalError,
    SlideFormatError,
    SlideOpenError,
    SlideTruncatedError,
)

__all__ = ["TiffLevel", "TiffPyramid", "read_tiff_pyramid", "VENDOR_TIFF_FLAGS"]

#: TIFF dialects whose pixels need vendor logic (overlapping or sparse tiles, huge JPEG strips,
#: several images per file): the auto backend sends them to OpenSlide.
VENDOR_TIFF_FLAGS = ("is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")

_PLAUSIBLE_MPP = (0.01, 1000.0)


@dataclass
class TiffLevel:
    """One pyramid level: size, segment grid and where each stored segment lies in the file."""

    width: int
    height: int
    segment_width: int  # tile width, or the image width for strips
    segment_height: int  # tile height, or rows per strip
    tiled: bool
    offsets: np.ndarray  # int64 (n_segments,)
    bytecounts: np.ndarray  # int64 (n_segments,)
    decode: Callable[..., Any]
    jpegtables: Optional[bytes]
    samples: int
    compression: int
    source: tuple[str, int]  # ("page", index) or ("subifd", index)

    @property
    def segments_across(self) -> int:
        return -(-self.width // self.segment_width)

    @property
    def segments_down(self) -> int:
        return -(-self.height // self.segment_height)


@dataclass
class TiffPyramid:
    levels: list[TiffLevel]
    mpp: Optional[tuple[float, float]]
    magnification: Optional[float]
    properties: dict[str, str]
    vendor: str


def _mpp_from_resolution(page: Any) -> Optional[tuple[float, float]]:
    tags = page.tags
    if 282 not in tags or 283 not in tags:
        return None
    unit = int(tags[296].value) if 296 in tags else 2
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if per_unit is None:
        return None

    def value(tag: Any) -> float:
        v = tag.value
        return v[0] / v[1] if isinstance(v, tuple) and len(v) == 2 and v[1] else float(v)

    try:
        xres, yres = value(tags[282]), value(tags[283])
    except (TypeError, ZeroDivisionError, ValueError):
        return None
    if xres <= 0 or yres <= 0:
        return None
    mpp = (per_unit / xres, per_unit / yres)
    if not all(_PLAUSIBLE_MPP[0] <= m <= _PLAUSIBLE_MPP[1] for m in mpp):
        return None
    return mpp


def _aperio_fields(description: str) -> dict[str, str]:
    fields = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            key, _, val = part.partition("=")
            fields[key.strip()] = val.strip()
    return fields


def _ome_scale(xml: str) -> tuple[Optional[tuple[float, float]], Optional[float]]:
    mpp = None
    mx = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    my = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', xml)
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
    if mx and factor is not None:
        x = float(mx.group(1)) * factor
        y = float(my.group(1)) * factor if my else x
        mpp = (x, y)
    mag = re.search(r'NominalMagnification="([0-9.eE+-]+)"', xml)
    return mpp, float(mag.group(1)) if mag else None


def _level_from_page(page: Any, source: tuple[str, int]) -> TiffLevel:
    if page.planarconfig == 2 and page.samplesperpixel > 1:
        raise SlideFormatError("separate sample planes (PlanarConfiguration 2) are not supported")
    if getattr(page, "imagedepth", 1) > 1:
        raise SlideFormatError("volumetric tiles (ImageDepth > 1) are not supported")
    tiled = bool(page.is_tiled)
    return TiffLevel(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        segment_width=int(page.tilewidth) if tiled else int(page.imagewidth),
        segment_height=int(page.tilelength) if tiled else int(min(page.rowsperstrip, page.imagelength)),
        tiled=tiled,
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
        decode=page.decode,
        jpegtables=page.jpegtables,
        samples=int(page.samplesperpixel),
        compression=int(page.compression),
        source=source,
    )


def read_tiff_pyramid(path: "str | Path", allow_vendor: bool = False) -> TiffPyramid:
    """Parse the pyramid of a TIFF-family file; clear errors for truncated or flat files."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SlideOpenError(f"slide {path}: file does not exist")
    size = path.stat().st_size
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as err:  # TiffFileError, struct errors on truncated headers
        raise SlideOpenError(f"slide {path}: not a readable TIFF file ({type(err).__name__}: {err})") from err
    try:
        vendor_flags = [f for f in VENDOR_TIFF_FLAGS if getattr(tif, f, False)]
        if vendor_flags and not allow_vendor:
            raise SlideFormatError(
                f"slide {path}: a vendor TIFF dialect ({vendor_flags[0][3:]}) whose tiles need vendor "
                f"logic; use backend='openslide'"
            )
        is_svs = bool(tif.is_svs)
        candidates: list[tuple[tuple[str, int], Any]] = []
        try:
            pages: list[Any] = list(tif.pages)  # TiffPage, or TiffFrame (no tags of its own; skipped)
        except Exception as err:
            raise SlideTruncatedError(f"slide {path}: TIFF directories cannot be read, file damaged or truncated ({err})") from err
        for i, page in enumerate(pages):
            if not hasattr(page, "is_tiled"):
                continue
            if is_svs:
                lines = (page.description or "").splitlines()
                kind = lines[1].split()[0].lower() if len(lines) > 1 and lines[1].split() else ""
                if i == 1 or kind in ("label", "macro"):
                    continue  # page 1 is the stripped thumbnail, never a level
            candidates.append((("page", i), page))
            if i == 0 and page.subifds:
                try:
                    for j, sub in enumerate(page.pages or ()):
                        candidates.append((("subifd", j), sub))
                except Exception as err:
                    raise SlideTruncatedError(f"slide {path}: sub-IFDs cannot be read, file damaged or truncated ({err})") from err
        usable = [
            (src, p)
            for src, p in candidates
            if p.is_tiled and not (int(p.subfiletype) & 4) and p.imagewidth > 0 and p.imagelength > 0
        ]
        if not usable:
            first = pages[0] if pages else None
            shape = f" ({first.imagewidth}x{first.imagelength}, stored in strips)" if first is not None else ""
            raise NotPyramidalError(
                f"slide {path}: not a tiled/pyramidal slide{shape}; whole-slide readers need a tiled "
                f"TIFF (convert it, e.g. with tifffile or vips tiffsave --tile --pyramid)"
            )
        usable.sort(key=lambda sp: -int(sp[1].imagewidth) * int(sp[1].imagelength))
        base_src, base = usable[0]
        if base.dtype is None or np.dtype(base.dtype) != np.uint8:
            raise SlideFormatError(
                f"slide {path}: pixels are {base.dtype} with {base.samplesperpixel} samples; "
                f"only 8-bit brightfield (grey, RGB, RGBA) slides are supported"
            )
        if base.samplesperpixel not in (1, 3, 4):
            raise SlideFormatError(f"slide {path}: {base.samplesperpixel} samples per pixel; expected 1, 3 or 4")
        w0, h0 = int(base.imagewidth), int(base.imagelength)
        levels: list[TiffLevel] = []
        seen: set[tuple[int, int]] = set()
        for src, page in usable:
            w, h = int(page.imagewidth), int(page.imagelength)
            if (w, h) in seen or page.samplesperpixel != base.samplesperpixel or page.dtype != base.dtype:
                continue
            expected_h = h0 * w / w0
            if abs(h - expected_h) > max(2.0, 0.01 * h):
                continue  # another image (macro, overview) with a different aspect ratio
            try:
                level = _level_from_page(page, src)
            except SlideFormatError as err:
                raise SlideFormatError(f"slide {path}: {err}") from None
            end = int((level.offsets + level.bytecounts).max()) if len(level.offsets) else 0
            if end > size:
                raise SlideTruncatedError(
                    f"slide {path}: truncated: tile data of level {len(levels)} ends at byte {end} "
                    f"but the file has {size} bytes"
                )
            seen.add((w, h))
            levels.append(level)
        properties: dict[str, str] = {}
        mpp: Optional[tuple[float, float]] = None
        magnification: Optional[float] = None
        vendor = "generic-tiff"
        if is_svs:
            vendor = "aperio"
            fields = _aperio_fields(base.description or "")
            properties.update({f"aperio.{k}": v for k, v in fields.items()})
            try:
                m = float(fields["MPP"])
                mpp = (m, m) if _PLAUSIBLE_MPP[0] <= m <= _PLAUSIBLE_MPP[1] else None
            except (KeyError, ValueError):
                mpp = None
            try:
                magnification = float(fields["AppMag"])
            except (KeyError, ValueError):
                magnification = None
        elif tif.is_ome:
            vendor = "ome"
            mpp, magnification = _ome_scale(tif.ome_metadata or "")
        if mpp is None:
            mpp = _mpp_from_resolution(base)
        properties["tiff.ImageDescription"] = base.description or ""
        return TiffPyramid(levels=levels, mpp=mpp, magnification=magnification, properties=properties, vendor=vendor)
    finally:
        tif.close()
