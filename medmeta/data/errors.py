"""Errors of the data layer: each names the file, the field and what was expected.

They subclass the built-in exceptions callers already catch (``ValueError``,
``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["DataFormatError", "MissingDataError", "UnknownNameError", "known_names"]


class DataFormatError(ValueError):
    """A file or field of a MedIMeta-format dataset does not hold what the format requires."""


class MissingDataError(DataFormatError, FileNotFoundError):
    """A file the format requires is missing."""

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


class UnknownNameError(DataFormatError, KeyError):
    """An unknown dataset id, task name or split name; the message lists what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def known_names(name: str, known: Iterable[str], limit: int = 30) -> str:
    """``known`` as a readable list, the names closest to ``name`` first."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
    rest = sorted(k for k in known if k not in close)
    ordered = close + rest
    text = ", ".join(repr(k) for k in ordered[:limit])
    if len(ordered) > limit:
        text += f", ... ({len(ordered) - limit} more)"
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}? Known: {text}"
    return f"known: {text}" if ordered else "none exist"
