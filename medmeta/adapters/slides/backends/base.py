"""The one reader interface every slide backend implements.

A :class:`SlideReader` exposes the pyramid (levels, dimensions, downsamples), the physical
scale (microns per pixel, objective power), the stored tile grid, and region reads that return
``uint8`` RGB arrays of shape ``(h, w, 3)``. Pixels outside the slide read as white, the colour of
an empty glass slide, in every backend.

Readers pickle by path (``__reduce__``) and reopen their file handles when used in a new
process (a forked DataLoader worker), so a dataset can hold one and hand it to workers.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from medmeta.adapters.slides.errors import SlideOpenError

__all__ = ["SlideReader", "slide_fingerprint", "composite_rgba_on_white", "TileSize", "DEFAULT_CACHE_BYTES"]

TileSize = Optional[tuple[int, int]]

#: The decoded-tile cache budget of one reader unless ``cache_bytes`` says otherwise.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024

#: Bytes of the file's start hashed into the fingerprint (the TIFF header and, for files written
#: front to back, the IFDs) and of its end (where some writers put the IFDs).
_HEAD_BYTES = 1 << 20
_TAIL_BYTES = 1 << 16


def slide_fingerprint(path: "str | Path") -> str:
    """A stable hash of a slide file: its size, its first MiB and its last 64 KiB.

    Cheap for gigapixel files (two small reads) and independent of the file's name or location,
    so caches of coordinates and features survive renames but not a changed file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
            tail = b""
            if size > _HEAD_BYTES:
                fh.seek(max(_HEAD_BYTES, size - _TAIL_BYTES))
                tail = fh.read(_TAIL_BYTES)
    except OSError as err:
        raise SlideOpenError(f"slide {path}: cannot be read for its fingerprint ({err})") from err
    digest = hashlib.sha256()
    digest.update(size.to_bytes(8, "little"))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()[:32]


def composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight (non-premultiplied) RGBA ``(h, w, 4)`` over a white background, as RGB uint8."""
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class SlideReader(ABC):
    """A whole-slide image: pyramid geometry, scale and region reads.

    Subclasses fill ``_level_dimensions``, ``_level_downsamples``, ``_mpp``, ``_magnification``,
    ``_tile_sizes`` and ``properties`` in ``__init__`` and implement :meth:`_read_level` (a
    region in *level* pixel coordinates, always inside the level) and :meth:`_open` /
    :meth:`_close` for the file handles.

    Every backend takes the same options, the ones :func:`~medmeta.adapters.slides.reader.open_slide`
    passes on: ``(path, cache_bytes=DEFAULT_CACHE_BYTES)``, the byte budget of the reader's
    decoded-tile cache (backends whose library keeps its own cache accept it and say so).
    """

    backend: str = ""
    #: Levels up to this many pixels are read whole for a thumbnail; larger ones in strips.
    thumbnail_whole_level_pixels: int = 64 * 1024 * 1024

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = Path(path)
        if int(cache_bytes) < 0:
            raise ValueError(f"slide {self.path}: cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self._options: dict[str, Any] = {"cache_bytes": self.cache_bytes}
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._level_downsamples: tuple[float, ...] = ()
        self._mpp: Optional[tuple[float, float]] = None
        self._magnification: Optional[float] = None
        self._tile_sizes: tuple[TileSize, ...] = ()
        self._fingerprint: Optional[str] = None
        self.properties: dict[str, str] = {}
        self._pid = os.getpid()
        self._closed = False

    # ---- geometry and scale -------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def mpp(self) -> Optional[tuple[float, float]]:
        """Level-0 microns per pixel ``(x, y)``, or ``None`` when the file does not say."""
        return self._mpp

    @property
    def magnification(self) -> Optional[float]:
        """Objective power of level 0 (e.g. 20.0), or ``None`` when the file does not say."""
        return self._magnification

    @property
    def tile_size(self) -> tuple[TileSize, ...]:
        """The stored tile grid ``(tile_width, tile_height)`` of each level, ``None`` if untiled."""
        return self._tile_sizes

    @property
    def fingerprint(self) -> str:
        """See :func:`slide_fingerprint`; computed once per reader."""
        if self._fingerprint is None:
            self._fingerprint = slide_fingerprint(self.path)
        return self._fingerprint

    def level_mpp(self, level: int) -> Optional[tuple[float, float]]:
        """Microns per pixel at ``level`` (level-0 mpp times the level's downsample)."""
        if self._mpp is None:
            return None
        ds = self._level_downsamples[self._check_level(level)]
        return (self._mpp[0] * ds, self._mpp[1] * ds)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed ``downsample`` (1% tolerance).

        Same rule as OpenSlide's ``get_best_level_for_downsample``, with a small tolerance so
        that a level whose downsample is 4.008 (odd level sizes) counts as a downsample of 4.
        """
        downsample = float(downsample)
        if not np.isfinite(downsample) or downsample <= 0:
            raise ValueError(f"slide {self.path}: downsample must be a positive number, got {downsample}")
        best = 0
        for i, ds in enumerate(self._level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    # ---- reads --------------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise TypeError(f"slide {self.path}: level must be an int, got {type(level).__name__}")
        if not 0 <= int(level) < self.level_count:
            raise ValueError(
                f"slide {self.path}: level {level} does not exist; the slide has {self.level_count} "
                f"level(s) 0..{self.level_count - 1}"
            )
        return int(level)

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """RGB ``uint8`` array ``(h, w, 3)`` of the region at ``level``.

        ``location`` is the top-left ``(x, y)`` in level-0 pixels (OpenSlide's convention); the
        region starts at level pixel ``(floor(x / d), floor(y / d))`` with ``d`` the level's
        downsample. Parts outside the slide are white.
        """
        if self._closed:
            raise ValueError(f"slide {self.path}: read from a closed reader")
        level = self._check_level(level)
        try:
            x, y = (int(v) for v in location)
            w, h = (int(v) for v in size)
        except (TypeError, ValueError):
            raise TypeError(
                f"slide {self.path}: location and size must be pairs of ints, got {location!r}, {size!r}"
            ) from None
        if w <= 0 or h <= 0:
            raise ValueError(f"slide {self.path}: region size must be positive, got ({w}, {h})")
        self._ensure_process()
        ds = self._level_downsamples[level]
        lx, ly = _level_coord(x, ds), _level_coord(y, ds)
        lw, lh = self._level_dimensions[level]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            return self._read_level(level, lx, ly, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB ``(h, w, 3)`` at level pixel ``(x, y)``; the region lies inside the level."""

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as one RGB array (mind the size: use it for small levels)."""
        level = self._check_level(level)
        w, h = self._level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def get_thumbnail(self, max_size: "int | Sequence[int]" = 1024) -> np.ndarray:
        """An RGB thumbnail that fits in ``max_size`` (an int or ``(w, h)``), aspect kept.

        Reads the smallest level at least as large as the thumbnail, strip by strip (memory
        stays bounded on single-level slides), and reduces it with an antialiasing filter.
        """
        if isinstance(max_size, (int, np.integer)):
            mw = mh = int(max_size)
        else:
            mw, mh = (int(v) for v in max_size)
        if mw <= 0 or mh <= 0:
            raise ValueError(f"slide {self.path}: thumbnail size must be positive, got {max_size!r}")
        w0, h0 = self.dimensions
        scale = min(mw / w0, mh / h0, 1.0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.best_level_for_downsample(max(w0 / tw, h0 / th))
        lw, lh = self._level_dimensions[level]
        ds = self._level_downsamples[level]
        factor = max(1, int(min(lw / tw, lh / th)))  # integer pre-reduction per strip
        strip = max(factor, (4096 // factor) * factor)
        if lw * lh <= self.thumbnail_whole_level_pixels:
            reduced = self.read_region((0, 0), level, (lw, lh))
            factor = 1
        else:
            parts = []
            for y in range(0, lh - lh % factor or lh, strip):
                hh = min(strip, lh - y)
                hh -= hh % factor
                if hh <= 0:
                    break
                part = self.read_region((0, round(y * ds)), level, (lw, hh))
                parts.append(_block_mean(part, factor))
            reduced = np.concatenate(parts, axis=0)
        img = Image.fromarray(reduced)
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(img)

    # ---- process safety and lifetime -------------------------------------------------------
    def _ensure_process(self) -> None:
        """Reopen file handles after a fork: a handle shared with the parent shares its offset."""
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            self._reopen()

    def _reopen(self) -> None:
        """Drop handles inherited from another process and open fresh ones."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by path and options: a DataLoader worker reopens the file itself.
        return (_unpickle_reader, (str(self.path), self.backend, dict(self._options)))

    def __repr__(self) -> str:
        mpp = "unknown" if self._mpp is None else f"{self._mpp[0]:.4g}"
        return (
            f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r}, "
            f"dimensions={self.dimensions}, levels={self.level_count}, mpp={mpp})"
        )


def _unpickle_reader(path: str, backend: str, options: dict[str, Any]) -> "SlideReader":
    from medmeta.adapters.slides.reader import open_slide

    return open_slide(path, backend=backend, **options)


def _level_coord(v: int, ds: float) -> int:
    """Level pixel of level-0 coordinate ``v`` (floor, robust to 4095.9999 from float division)."""
    return int(np.floor(v / ds + 1e-6))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f, a.shape[2]).mean(axis=(1, 3)).round().astype(np.uint8)
