"""libvips through ``pyvips`` (optional; ``pip install pyvips pyvips-binary``).

Each level is loaded with ``tiffload`` from the page or sub-IFD that
:func:`~medmeta.adapters.slides.backends.tiff_pyramid.read_tiff_pyramid` found, so pyvips sees
the same levels as the tifffile backend (sub-IFD pyramids included, the Aperio thumbnail
excluded), and regions are fetched with ``Region.fetch`` (no whole-image pipeline per read).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES, SlideReader, composite_rgba_on_white
from medmeta.adapters.slides.backends.tiff_pyramid import read_tiff_pyramid
from medmeta.adapters.slides.errors import BackendUnavailableError, SlideReadError

__all__ = ["PyvipsReader"]


def _import_pyvips() -> Any:
    try:
        import pyvips
    except (ImportError, OSError) as err:
        raise BackendUnavailableError(
            "backend 'pyvips' needs pyvips with libvips: pip install pyvips pyvips-binary"
        ) from err
    return pyvips


class PyvipsReader(SlideReader):
    """TIFF-family slides read by libvips, one ``Region`` per level."""

    backend = "pyvips"

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        self._pyvips = _import_pyvips()
        pyramid = read_tiff_pyramid(self.path)
        w0, h0 = pyramid.levels[0].width, pyramid.levels[0].height
        self._sources = [lv.source for lv in pyramid.levels]
        self._level_dimensions = tuple((lv.width, lv.height) for lv in pyramid.levels)
        self._level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2.0 for lv in pyramid.levels)
        self._tile_sizes = tuple(
            (lv.segment_width, lv.segment_height) if lv.tiled else None for lv in pyramid.levels
        )
        self._mpp, self._magnification = pyramid.mpp, pyramid.magnification
        self.properties = dict(pyramid.properties)
        self.vendor = pyramid.vendor
        self._pyvips.cache_set_max_mem(int(cache_bytes))
        self._open()

    def _open(self) -> None:
        self._regions: list[Any] = [None] * len(self._sources)
        self._images: list[Any] = [None] * len(self._sources)
        self._locks = [threading.Lock() for _ in self._sources]

    def _reopen(self) -> None:
        self._open()

    def _region(self, level: int) -> Any:
        if self._regions[level] is None:
            kind, index = self._sources[level]
            kwargs = {"page": index} if kind == "page" else {"page": 0, "subifd": index}
            image = self._pyvips.Image.tiffload(str(self.path), access="random", **kwargs)
            self._images[level] = image
            self._regions[level] = self._pyvips.Region.new(image)
        return self._regions[level]

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            with self._locks[level]:
                region = self._region(level)
                data = region.fetch(x, y, w, h)
                bands = self._images[level].bands
        except self._pyvips.Error as err:
            raise SlideReadError(f"slide {self.path}: pyvips could not read level {level} at ({x}, {y}): {err}") from err
        arr = np.frombuffer(data, dtype=np.uint8).reshape(h, w, bands)
        if bands == 3:
            return arr.copy()
        if bands == 1:
            return np.repeat(arr, 3, axis=-1)
        return composite_rgba_on_white(arr)

    def close(self) -> None:
        self._regions = [None] * len(self._sources)
        self._images = [None] * len(self._sources)
        super().close()
