"""OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel: no system library needed).

Reads every format OpenSlide knows (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana,
generic tiled TIFF, DICOM). Its decoded-tile cache is replaced by an ``OpenSlideCache`` of a
fixed capacity per reader, so the memory of long-lived DataLoader workers stays bounded.
OpenSlide returns straight RGBA; areas outside the scanned region are transparent and are
composited onto white like every other backend.

:class:`OpenSlideAPIReader` adapts any object with OpenSlide's Python API (the ``kfbslide``
backend uses it too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES, SlideReader, composite_rgba_on_white
from medmeta.adapters.slides.errors import (
    BackendUnavailableError,
    SlideFormatError,
    SlideOpenError,
    SlideReadError,
)

__all__ = ["OpenSlideAPIReader", "OpenSlideReader"]


def _float_property(props: Any, key: str) -> Optional[float]:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


class OpenSlideAPIReader(SlideReader):
    """A reader over an object with OpenSlide's API (``read_region``, ``level_dimensions``...)."""

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        if not self.path.is_file():
            raise SlideOpenError(f"slide {self.path}: file does not exist")
        self._slide = self._open_handle()
        self._describe()

    def _open_handle(self) -> Any:
        raise NotImplementedError

    def _describe(self) -> None:
        s = self._slide
        props = s.properties
        self.properties = {str(k): str(v) for k, v in props.items()}
        self._level_dimensions = tuple((int(w), int(h)) for w, h in s.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in s.level_downsamples)
        mx, my = _float_property(props, "openslide.mpp-x"), _float_property(props, "openslide.mpp-y")
        self._mpp = (mx, my if my is not None else mx) if mx is not None else None
        self._magnification = _float_property(props, "openslide.objective-power")
        tiles = []
        for i in range(len(self._level_dimensions)):
            tw = props.get(f"openslide.level[{i}].tile-width")
            th = props.get(f"openslide.level[{i}].tile-height")
            tiles.append((int(tw), int(th)) if tw and th else None)
        self._tile_sizes = tuple(tiles)

    def _reopen(self) -> None:
        # The handle inherited through fork shares file offsets with the parent: open anew.
        self._slide = self._open_handle()

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        # Level-0 location whose floor(x0 / ds) is exactly x (OpenSlide divides the same way).
        x0, y0 = level0_coordinate(x, ds), level0_coordinate(y, ds)
        try:
            rgba = np.asarray(self._slide.read_region((x0, y0), level, (w, h)))
        except Exception as err:
            raise SlideReadError(
                f"slide {self.path}: {self.backend} could not read level {level} at ({x}, {y}) "
                f"size ({w}, {h}): {err}"
            ) from err
        return composite_rgba_on_white(rgba)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            try:
                slide.close()
            except Exception:
                pass
            self._slide = None
        super().close()


def level0_coordinate(v: int, ds: float) -> int:
    """The level-0 coordinate whose ``floor(x0 / ds)`` is exactly ``v`` at a level of downsample ``ds``."""
    x0 = int(round(v * ds))
    while x0 / ds + 1e-6 < v:  # guard against float round-down
        x0 += 1
    return x0


class OpenSlideReader(OpenSlideAPIReader):
    """OpenSlide with a bounded tile cache (``cache_bytes`` per reader, default 32 MiB)."""

    backend = "openslide"

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        self.vendor = self.properties.get("openslide.vendor", "")

    def _open_handle(self) -> Any:
        try:
            import openslide
        except ImportError as err:  # pragma: no cover - the wsi extra installs it
            raise BackendUnavailableError(
                "backend 'openslide' needs openslide-python and openslide-bin: pip install 'medmeta[wsi]'"
            ) from err
        try:
            slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            from medmeta.adapters.slides.reader import is_tiff_file

            if is_tiff_file(self.path):
                raise SlideFormatError(
                    f"slide {self.path}: OpenSlide cannot read this TIFF (not tiled, an unsupported "
                    f"layout, or damaged/truncated)"
                ) from err
            raise SlideOpenError(f"slide {self.path}: OpenSlide does not recognise this file format") from err
        except openslide.OpenSlideError as err:
            raise SlideFormatError(f"slide {self.path}: OpenSlide cannot open it, damaged or truncated? ({err})") from err
        slide.set_cache(openslide.OpenSlideCache(self.cache_bytes))
        return slide
