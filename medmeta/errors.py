"""Every error medmeta raises on purpose, under one root.

:class:`MedMetaError` is the root. :class:`UserError` is the branch a user can fix (a config
value, a path, a file's contents, too little data, a checkpoint that does not fit): the
command-line apps end such an error with one line on stderr and exit status 2
(:func:`exit_on_user_error`); anything else is a bug and keeps its traceback.

Each class also derives from the built-in exception that callers already catch
(``ValueError``, ``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Iterable
from typing import Any, Callable, Optional, TypeVar

__all__ = [
    "MedMetaError",
    "UserError",
    "ConfigError",
    "DataFormatError",
    "MissingDataError",
    "UnknownNameError",
    "InsufficientDataError",
    "CheckpointError",
    "ArgumentError",
    "MissingDependencyError",
    "UntrustedFileError",
    "DiskFullError",
    "BusyError",
    "exit_on_user_error",
    "known_names",
]

T = TypeVar("T")


class MedMetaError(Exception):
    """Root of every error that medmeta raises on purpose."""


class UserError(MedMetaError):
    """An error the user can fix; the message names the option, file or field and what was expected."""


class ConfigError(UserError, ValueError):
    """A config value or argument that cannot work."""


class DataFormatError(UserError, ValueError):
    """A file or field of a dataset does not hold what its format requires."""


class MissingDataError(DataFormatError, FileNotFoundError):
    """A file that the format requires is missing."""

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


class UnknownNameError(UserError, KeyError, ValueError):
    """An unknown name (dataset id, task, split, registered component); the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InsufficientDataError(UserError, ValueError):
    """A task has too few images (or classes) to form the requested episodes."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read safely, or that does not fit the run or learner loading it."""


class ArgumentError(ConfigError, TypeError):
    """A named component (learner, backbone, segmenter, ...) was given an argument it does not take."""


class MissingDependencyError(UserError, ModuleNotFoundError):
    """An optional package is not installed; the message names the ``pip install`` that adds it."""


class UntrustedFileError(UserError, PermissionError):
    """A file that runs code when read (a pickle) was not marked as trusted."""

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


class DiskFullError(UserError, OSError):
    """A write failed for lack of space (``ENOSPC`` / ``EDQUOT``); the message names the file. The
    file it was replacing (a checkpoint, a dataset) is left as it was."""

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


class BusyError(UserError, RuntimeError):
    """A run folder or data root is in use by another live process (see :mod:`medmeta.locks`);
    the message names that process (pid, host, start time)."""


def known_names(name: str, known: Iterable[str], limit: int = 30, *, what: str = "") -> str:
    """``known`` as a readable list, the names closest to ``name`` first; ``what`` (a plural such
    as ``"learners"``) names the list: ``known learners: ...``."""
    names = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    ordered = close + sorted(k for k in names if k not in close)
    text = ", ".join(repr(k) for k in ordered[:limit])
    if len(ordered) > limit:
        text += f", ... ({len(ordered) - limit} more)"
    label = f"known {what}".rstrip()
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}? {label[0].upper()}{label[1:]}: {text}"
    if not ordered:
        return f"no {what} exist" if what else "none exist"
    return f"{label}: {text}"


def exit_on_user_error(app: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; a :class:`UserError` is logged, printed as ``<app>: error: ...`` on stderr and
    ends the process with status 2. Library callers use the functions directly and get the exception."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        _log_to_files(f"{type(err).__name__}: {err}")
        print(f"{app}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _log_to_files(message: str) -> None:
    """Record ``message`` in the run's log files (Hydra's job log, a runner's log file) but not on
    the console, where the one ``<app>: error:`` line already says it."""
    logger: Optional[logging.Logger] = logging.getLogger("medmeta")
    record = logging.getLogger("medmeta").makeRecord("medmeta", logging.ERROR, __file__, 0, message, (), None)
    while logger is not None:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            console = stream is not None and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
            if not console and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None
