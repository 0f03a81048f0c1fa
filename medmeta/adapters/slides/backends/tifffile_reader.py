"""The fast path: decode the stored TIFF tiles directly (tifffile's decoders, imagecodecs codecs).

A region read finds the stored tiles it covers, reads their bytes with positional reads
(``os.pread``: no shared file offset, so threads and forked workers can read at once), decodes
each once (JPEG with its tables and YCbCr subsampling, zlib/LZW with predictors, JPEG 2000,
WebP: whatever tifffile decodes) and copies the covered parts. A read aligned to the stored grid
decodes one tile and copies nothing else, which is why tiling snaps to the grid.

Decoded tiles are kept in a small least-recently-used cache bounded in bytes, so neighbouring
reads share decodes without the cache growing in long-lived DataLoader workers.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES, SlideReader
from medmeta.adapters.slides.backends.tiff_pyramid import TiffLevel, read_tiff_pyramid
from medmeta.adapters.slides.errors import SlideReadError

__all__ = ["TifffileReader", "TileCache"]


class TileCache:
    """A thread-safe LRU cache of decoded tiles, bounded in bytes (0 disables it)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._items: "OrderedDict[tuple[int, int], np.ndarray]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> Optional[np.ndarray]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[int, int], value: np.ndarray) -> None:
        if value.nbytes > self.capacity_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.capacity_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class TifffileReader(SlideReader):
    """Reads SVS (Aperio), generic tiled TIFF and pyramidal TIFF (pages or sub-IFDs) itself.

    Args:
        path: the slide file.
        cache_bytes: capacity of the decoded-tile cache (default 32 MiB per reader).
    """

    backend = "tifffile"

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        pyramid = read_tiff_pyramid(self.path)
        self._levels: list[TiffLevel] = pyramid.levels
        w0, h0 = pyramid.levels[0].width, pyramid.levels[0].height
        self._level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        self._level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2.0 for lv in self._levels)
        self._tile_sizes = tuple(
            (lv.segment_width, lv.segment_height) if lv.tiled else None for lv in self._levels
        )
        self._mpp = pyramid.mpp
        self._magnification = pyramid.magnification
        self.properties = dict(pyramid.properties)
        self.properties["medmeta.vendor"] = pyramid.vendor
        self.vendor = pyramid.vendor
        self._cache = TileCache(cache_bytes)
        self._lock = threading.Lock()
        self._fh: Optional[BinaryIO] = None
        self._fd = -1
        self._open()

    # ---- file handles -------------------------------------------------------------------
    def _open(self) -> None:
        if hasattr(os, "pread"):
            self._fd = os.open(self.path, os.O_RDONLY)
        else:  # pragma: no cover - Windows: seek + read under a lock
            self._fh = open(self.path, "rb")

    def _reopen(self) -> None:
        self._release()
        self._cache.clear()
        self._open()

    def _release(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self._release()
        self._cache.clear()
        super().close()

    def _read_bytes(self, offset: int, count: int) -> bytes:
        if self._fd >= 0:
            data = os.pread(self._fd, count, offset)
        else:  # pragma: no cover
            assert self._fh is not None
            with self._lock:
                self._fh.seek(offset)
                data = self._fh.read(count)
        if len(data) != count:
            raise SlideReadError(
                f"slide {self.path}: short read at byte {offset} ({len(data)} of {count} bytes); file truncated?"
            )
        return data

    # ---- tiles --------------------------------------------------------------------------
    def stored_tile(self, level: int, index: int) -> np.ndarray:
        """Decoded stored segment ``index`` of ``level`` as RGB ``(th, tw, 3)`` (edge tiles padded)."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        lv = self._levels[level]
        count = int(lv.bytecounts[index])
        if count == 0:
            tile = np.full((lv.segment_height, lv.segment_width, 3), 255, np.uint8)
        else:
            data = self._read_bytes(int(lv.offsets[index]), count)
            try:
                segment = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
            except Exception as err:
                raise SlideReadError(
                    f"slide {self.path}: level {level} tile {index} cannot be decoded "
                    f"({type(err).__name__}: {err})"
                ) from err
            if segment is None:
                tile = np.full((lv.segment_height, lv.segment_width, 3), 255, np.uint8)
            else:
                tile = _to_rgb(segment.reshape(segment.shape[-3:]))
        self._cache.put(key, tile)
        return tile

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        sw, sh = lv.segment_width, lv.segment_height
        across = lv.segments_across
        tx0, ty0 = x // sw, y // sh
        tx1, ty1 = (x + w - 1) // sw, (y + h - 1) // sh
        if tx0 == tx1 and ty0 == ty1:  # inside one stored tile: one decode, one copy
            tile = self.stored_tile(level, ty0 * across + tx0)
            ox, oy = x - tx0 * sw, y - ty0 * sh
            return tile[oy : oy + h, ox : ox + w].copy()
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(ty0, ty1 + 1):
            sy0 = max(y, ty * sh)
            sy1 = min(y + h, (ty + 1) * sh)
            for tx in range(tx0, tx1 + 1):
                sx0 = max(x, tx * sw)
                sx1 = min(x + w, (tx + 1) * sw)
                tile = self.stored_tile(level, ty * across + tx)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty * sh : sy1 - ty * sh, sx0 - tx * sw : sx1 - tx * sw
                ]
        return out

    def level_source(self, level: int) -> tuple[str, int]:
        """Where ``level`` is stored: ``("page", i)`` or ``("subifd", j)`` of the first page."""
        return self._levels[self._check_level(level)].source

    def raw_tile_bytes(self, level: int, index: int) -> tuple[bytes, Optional[bytes]]:
        """The encoded bytes of stored tile ``index`` and the level's JPEG tables (benchmarks)."""
        lv = self._levels[self._check_level(level)]
        return self._read_bytes(int(lv.offsets[index]), int(lv.bytecounts[index])), lv.jpegtables


def _to_rgb(segment: np.ndarray) -> np.ndarray:
    """``(h, w, samples)`` grey / RGB / RGBA uint8 as contiguous RGB (alpha over white)."""
    samples = segment.shape[-1]
    if samples == 3:
        return np.ascontiguousarray(segment)
    if samples == 1:
        return np.ascontiguousarray(np.repeat(segment, 3, axis=-1))
    from medmeta.adapters.slides.backends.base import composite_rgba_on_white

    return composite_rgba_on_white(segment)
