"""KFBio ``.kfb`` slides (Tianchi cervical cytology) through ``kfbslide``, an MIT pure-Python reader.

``kfbslide`` follows OpenSlide's Python API, so this backend is the OpenSlide adapter over a
``kfbslide.OpenSlide`` handle; ``kfbslide`` reopens its file after a fork by itself and keeps a
bounded per-instance tile cache of its own size (its ``set_cache`` is a no-op), so the reader
accepts ``cache_bytes`` like every backend but kfbslide does not use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES
from medmeta.adapters.slides.backends.openslide_reader import OpenSlideAPIReader
from medmeta.adapters.slides.errors import BackendUnavailableError, SlideOpenError

__all__ = ["KfbReader"]


class KfbReader(OpenSlideAPIReader):
    backend = "kfb"

    def __init__(self, path: "str | Path", cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        self.vendor = "kfbio"

    def _open_handle(self) -> Any:
        try:
            import kfbslide
        except ImportError as err:
            raise BackendUnavailableError("backend 'kfb' needs the kfbslide package: pip install kfbslide") from err
        try:
            return kfbslide.OpenSlide(str(self.path))
        except Exception as err:  # kfbslide raises its own OpenSlide-like errors
            raise SlideOpenError(f"slide {self.path}: kfbslide cannot open it as a KFB slide ({err})") from err
