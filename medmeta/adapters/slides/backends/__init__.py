"""Slide reader backends, one module each, registered by name.

Backends whose Python package is missing are still listed; opening a slide with one raises
:class:`~medmeta.adapters.slides.errors.BackendUnavailableError` with the install command.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from medmeta.adapters.slides.backends.base import SlideReader, slide_fingerprint

__all__ = ["BACKENDS", "backend_class", "backend_installed", "available_backends", "SlideReader", "slide_fingerprint"]

#: name -> (module, class, the Python package it needs)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "tifffile": ("medmeta.adapters.slides.backends.tifffile_reader", "TifffileReader", "tifffile"),
    "openslide": ("medmeta.adapters.slides.backends.openslide_reader", "OpenSlideReader", "openslide"),
    "pyvips": ("medmeta.adapters.slides.backends.pyvips_reader", "PyvipsReader", "pyvips"),
    "cucim": ("medmeta.adapters.slides.backends.cucim_reader", "CucimReader", "cucim"),
    "kfb": ("medmeta.adapters.slides.backends.kfb_reader", "KfbReader", "kfbslide"),
}


def backend_class(name: str) -> Callable[..., SlideReader]:
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown slide backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def backend_installed(name: str) -> bool:
    """Whether the Python package of backend ``name`` can be imported (and, for pyvips, libvips loads)."""
    package = BACKENDS[name][2]
    if importlib.util.find_spec(package) is None:
        return False
    if name == "pyvips":
        try:
            import pyvips  # noqa: F401  (loads the libvips shared library)
        except (ImportError, OSError):
            return False
    return True


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]
