"""Open a whole-slide image with one interface, whatever the format and backend.

``open_slide(path)`` picks the backend automatically:

1. ``.kfb`` files go to ``kfbslide`` (no other reader knows the format).
2. TIFF-family files (SVS, generic tiled TIFF, pyramidal TIFF in pages or sub-IFDs) go to the
   **tifffile** backend, which decodes the stored tiles itself: it sees sub-IFD pyramids as
   levels (OpenSlide and cuCIM see one level), skips the Aperio thumbnail page, needs no
   compositing of premultiplied RGBA, and reads at close to the raw tile-decoding rate
   (see ``benchmarks/bench_slides.py``). It is always installed with the ``wsi`` extra.
3. Vendor TIFF dialects that need vendor logic (Hamamatsu NDPI, Leica SCN, Philips, Ventana
   BIF with overlapping tiles) and every non-TIFF format (MIRAX, VMS, DICOM...) go to
   **OpenSlide**; so does a TIFF whose tiles the tifffile backend fails to decode on a probe.

pyvips and cuCIM are used only when asked for (``backend="pyvips"`` / ``"cucim"``): they are
optional installs. Any backend can be forced by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medmeta.adapters.slides.backends import available_backends, backend_class, list_backends
from medmeta.adapters.slides.backends.base import SlideReader, slide_fingerprint
from medmeta.adapters.slides.errors import (
    NotPyramidalError,
    SlideError,
    SlideFormatError,
    SlideOpenError,
    SlideTruncatedError,
)

__all__ = ["open_slide", "SlideReader", "slide_fingerprint", "available_backends", "list_backends", "is_tiff_file"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff_file(path: "str | Path") -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def open_slide(path: "str | Path", backend: str = "auto", **options: Any) -> SlideReader:
    """Open ``path`` with ``backend`` (``"auto"``, ``"tifffile"``, ``"openslide"``, ``"pyvips"``,
    ``"cucim"`` or ``"kfb"``); ``options`` go to the backend (e.g. ``cache_bytes``).

    Raises :class:`SlideOpenError` for a missing or unrecognised file and
    :class:`SlideFormatError` for a truncated or non-tiled one, naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"slide {path}: file does not exist")
    if path.is_dir():
        raise SlideOpenError(f"slide {path}: is a directory, expected a slide file")
    if backend != "auto":
        return backend_class(backend)(path, **options)
    if path.suffix.lower() == ".kfb":
        return backend_class("kfb")(path, **options)
    if is_tiff_file(path):
        try:
            reader = backend_class("tifffile")(path, **options)
            _probe(reader)
            return reader
        except (SlideTruncatedError, NotPyramidalError):
            raise  # no backend does better with a truncated or flat file
        except SlideError as err:  # vendor dialect, undecodable tiles, unusual layout
            tiff_error = err
        try:
            return backend_class("openslide")(path, **options)
        except SlideError as err:
            raise SlideFormatError(
                f"slide {path}: no backend can read it (tifffile: {tiff_error}; openslide: {err})"
            ) from err
    if path.stat().st_size == 0:
        raise SlideOpenError(f"slide {path}: file is empty")
    try:
        return backend_class("openslide")(path, **options)
    except SlideOpenError as err:
        raise SlideOpenError(
            f"slide {path}: not a recognised slide format (not TIFF/SVS; OpenSlide does not know it "
            f"either; supported: {list_backends()})"
        ) from err


def _probe(reader: SlideReader) -> None:
    """Decode one small stored tile so an undecodable compression falls back to OpenSlide now."""
    level = reader.level_count - 1
    reader.read_region((0, 0), level, (1, 1))
