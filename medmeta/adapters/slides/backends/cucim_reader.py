"""NVIDIA cuCIM (optional; ``pip install cucim-cu12``; CPU reads also work with ``--no-deps``
plus ``click`` and ``lazy_loader``).

cuCIM reads Aperio SVS and tiled TIFF pyramids stored as pages with its own fast decoder; like
OpenSlide it sees a sub-IFD pyramid as a single level. Microns per pixel come from cuCIM's
spacing (micrometre units) or the Aperio ``MPP`` field. cuCIM's tile cache is process-wide
(``CuImage.cache(...)``), not per reader: the reader accepts ``cache_bytes`` like every backend
and leaves that cache as configured.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES, SlideReader, composite_rgba_on_white
from medmeta.adapters.slides.backends.openslide_reader import level0_coordinate
from medmeta.adapters.slides.errors import BackendUnavailableError, SlideOpenError, SlideReadError

__all__ = ["CucimReader"]


class CucimReader(SlideReader):
    backend = "cucim"

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        if not self.path.is_file():
            raise SlideOpenError(f"slide {self.path}: file does not exist")
        self._image = self._open_handle()
        res = self._image.resolutions
        self._level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self._level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        self._tile_sizes = tuple((int(w), int(h)) for w, h in res["level_tile_sizes"])
        meta = self._image.metadata
        aperio = meta.get("aperio", {})
        self._mpp = None
        if "MPP" in aperio:
            try:
                self._mpp = (float(aperio["MPP"]),) * 2
            except ValueError:
                pass
        units = self._image.spacing_units()
        if self._mpp is None and len(units) >= 2 and units[0] in ("micrometer", "um", "µm"):
            sp = self._image.spacing()
            self._mpp = (float(sp[1]), float(sp[0])) if self._image.dims.startswith("YX") else (float(sp[0]), float(sp[1]))
        try:
            self._magnification = float(aperio["AppMag"]) if "AppMag" in aperio else None
        except ValueError:
            self._magnification = None
        self.properties = {f"aperio.{k}": str(v) for k, v in aperio.items()}
        self.vendor = "aperio" if aperio else "generic-tiff"

    def _open_handle(self) -> Any:
        try:
            from cucim import CuImage
        except ImportError as err:
            raise BackendUnavailableError("backend 'cucim' needs cuCIM: pip install cucim-cu12") from err
        try:
            return CuImage(str(self.path))
        except Exception as err:
            raise SlideOpenError(f"slide {self.path}: cuCIM cannot open it ({err})") from err

    def _reopen(self) -> None:
        self._image = self._open_handle()

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        try:
            arr = np.asarray(self._image.read_region((level0_coordinate(x, ds), level0_coordinate(y, ds)), (w, h), level))
        except Exception as err:
            raise SlideReadError(f"slide {self.path}: cuCIM could not read level {level} at ({x}, {y}): {err}") from err
        if arr.shape[-1] == 4:
            return composite_rgba_on_white(arr)
        return np.ascontiguousarray(arr)

    def close(self) -> None:
        self._image = None
        super().close()
