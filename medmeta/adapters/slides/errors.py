"""Errors of the slide adapter: each names the file and what was expected.

All derive from :class:`SlideError` (a :class:`~medmeta.errors.UserError` and a ``ValueError``),
so a batch run can catch one type per slide, record it, and go on with the other slides, and the
command-line apps end one with a single line and exit status 2.
"""
from __future__ import annotations

from medmeta.errors import UserError

__all__ = [
    "SlideError",
    "SlideOpenError",
    "SlideFormatError",
    "SlideTruncatedError",
    "NotPyramidalError",
    "SlideReadError",
    "BackendUnavailableError",
    "ScaleUnavailableError",
    "NoTissueError",
    "FingerprintMismatchError",
]


class SlideError(UserError, ValueError):
    """Base class of every slide-adapter error."""


class SlideOpenError(SlideError):
    """The file does not exist or no backend recognises it as a slide."""


class SlideFormatError(SlideError):
    """The file is a slide-like file that cannot be used: truncated, not tiled, unsupported pixels."""


class SlideTruncatedError(SlideFormatError):
    """Stored tile data ends beyond the end of the file (an interrupted copy or download)."""


class NotPyramidalError(SlideFormatError):
    """A flat image (stored in strips, no tiles): not a whole-slide image any reader can tile."""


class SlideReadError(SlideError):
    """A region could not be decoded (damaged tile data, I/O error)."""


class BackendUnavailableError(SlideError):
    """A backend was requested whose Python package is not installed."""


class ScaleUnavailableError(SlideError):
    """A requested magnification or microns per pixel the slide cannot give (no upsampling)."""


class NoTissueError(SlideError):
    """Tissue detection or filtering left nothing to tile."""


class FingerprintMismatchError(SlideError):
    """A cached file (coordinates, features) belongs to a different slide than the one given."""
