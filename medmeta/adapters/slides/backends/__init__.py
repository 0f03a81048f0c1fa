"""Slide reader backends, one module each, registered by name.

Each entry of :data:`BACKENDS` names the module and class of a reader and the Python package it
needs; the module is imported only when a slide is opened with it. Backends whose package is
missing are still listed; opening a slide with one raises
:class:`~medmeta.adapters.slides.errors.BackendUnavailableError` with the install command.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmeta.adapters.slides.backends.base import SlideReader, slide_fingerprint
from medmeta.registry import Registry

__all__ = [
    "BACKENDS",
    "BackendEntry",
    "backend_class",
    "backend_installed",
    "list_backends",
    "available_backends",
    "SlideReader",
    "slide_fingerprint",
]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend's reader class lives, and the Python package it needs."""

    module: str
    cls: str
    package: str

    def reader_class(self) -> type[SlideReader]:
        """The reader class (imports its module)."""
        reader: type[SlideReader] = getattr(importlib.import_module(self.module), self.cls)
        return reader

    def __call__(self, path: "str | Path", **options: Any) -> SlideReader:
        """Open ``path`` with this backend."""
        return self.reader_class()(path, **options)


#: name -> reader entry (``BACKENDS.create(name, path, **options)`` opens a slide)
BACKENDS: Registry[BackendEntry] = Registry("slide backend")
_BUILTIN = {
    "tifffile": BackendEntry("medmeta.adapters.slides.backends.tifffile_reader", "TifffileReader", "tifffile"),
    "openslide": BackendEntry("medmeta.adapters.slides.backends.openslide_reader", "OpenSlideReader", "openslide"),
    "pyvips": BackendEntry("medmeta.adapters.slides.backends.pyvips_reader", "PyvipsReader", "pyvips"),
    "cucim": BackendEntry("medmeta.adapters.slides.backends.cucim_reader", "CucimReader", "cucim"),
    "kfb": BackendEntry("medmeta.adapters.slides.backends.kfb_reader", "KfbReader", "kfbslide"),
}
for _name, _entry in _BUILTIN.items():
    BACKENDS.register(_name, _entry)
_PREFERENCE = tuple(_BUILTIN)


def backend_class(name: str) -> type[SlideReader]:
    """The reader class of backend ``name``; an unknown name lists the known ones."""
    return BACKENDS.get(name).reader_class()


def backend_installed(name: str) -> bool:
    """Whether the Python package of backend ``name`` can be imported (and, for pyvips, libvips loads)."""
    package = BACKENDS.get(name).package
    if importlib.util.find_spec(package) is None:
        return False
    if name == "pyvips":
        try:
            import pyvips  # noqa: F401  (loads the libvips shared library)
        except (ImportError, OSError):
            return False
    return True


def list_backends() -> list[str]:
    """Every registered backend name, installed or not, sorted."""
    return BACKENDS.names()


def available_backends() -> list[str]:
    """The backends whose Python package is installed, built-in ones in order of preference."""
    return sorted((name for name in BACKENDS if backend_installed(name)), key=_preference)


def _preference(name: str) -> tuple[int, str]:
    return (_PREFERENCE.index(name) if name in _PREFERENCE else len(_PREFERENCE), name)
