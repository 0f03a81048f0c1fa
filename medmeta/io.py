"""Atomic file writes and the one safe ``torch.load``.

Every file medmeta writes appears whole or not at all.

A run killed mid-write must never leave a half-written checkpoint, result table or dataset file
behind. Each writer goes through a temporary file in the target's folder (same file system),
``fsync`` and ``os.replace``, so readers see the old file or the new one. Temporary files get the
usual ``0666 & ~umask`` permissions (``mkstemp`` alone would make results readable by their owner
only, which breaks shared cluster folders).

Every tensor file medmeta reads (checkpoints, weights, saved heads, challenge outputs) goes
through :func:`load_torch_file`: ``torch.load`` with ``weights_only=True`` on the CPU, so no pickled code
ever runs, with an error that names the file when it is missing or holds more than tensors.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

from medmeta.errors import DataFormatError, DiskFullError, MissingDataError, UserError

__all__ = [
    "atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "load_torch_file",
    "is_disk_full", "disk_full_error", "contained_path",
]

PathLike = Union[str, Path]


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def contained_path(base: PathLike, relative: Any, where: str) -> Path:
    """``base / relative`` for a path read from a table, refused (a
    :class:`~medmeta.errors.DataFormatError` naming ``where``) when it is empty, absolute, or
    leaves ``base`` through ``..`` or a symlink: a table never makes medmeta read files outside its folder."""
    text = "" if relative is None else str(relative).strip()
    if not text:
        raise DataFormatError(f"{where}: an empty file path (expected a path relative to {base})")
    base = Path(base)
    path = base / text
    root = base.resolve()
    target = path.resolve()
    if Path(text).is_absolute() or (target != root and root not in target.parents):
        raise DataFormatError(
            f"{where}: file path {text!r} points outside {base} (to {target}); expected a path inside that folder "
            f"(no '..', absolute paths or symlinks leading out)"
        )
    return path


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for lack of space (``ENOSPC``, ``EDQUOT``; h5py and
    other libraries that re-raise without the errno keep the C library's message)."""
    if not isinstance(err, OSError) or isinstance(err, DiskFullError):
        return False
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_error(path: PathLike, err: BaseException, kept: str = "") -> DiskFullError:
    """The :class:`~medmeta.errors.DiskFullError` for a write of ``path`` that ran out of space;
    ``kept`` says what was left intact."""
    return DiskFullError(
        f"{path}: no space left on the device while writing it ({err}); "
        + (kept or f"the previous {Path(path).name}, if any, is left as it was")
        + "; free some space and run again"
    )


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for any writer (``torch.save``, h5py, PIL, nibabel);
    when the block ends without error the file is synced and renamed onto ``path``, otherwise it
    is removed. ``suffix`` keeps writers that choose the format by extension happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, payload: Any) -> Path:
    """Write compact JSON to ``path`` atomically; returns ``path``."""
    return write_bytes_atomic(path, (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8"))


def load_torch_file(
    path: PathLike,
    what: str = "tensor file",
    *,
    map_location: Any = "cpu",
    error: type[UserError] = DataFormatError,
) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain Python values, never pickled code.

    ``what`` names the file in errors (``"checkpoint"``, ``"weights file"``). A missing file is a
    :class:`~medmeta.errors.MissingDataError`; a file that ``weights_only`` loading refuses (not a
    torch file, or a pickle with code in it) raises ``error`` (a :class:`~medmeta.errors.UserError`
    class, :class:`~medmeta.errors.DataFormatError` by default).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a corrupt file, or a pickle that needs code to load
        raise error(
            f"{what} {path}: cannot be read by torch.load with weights_only=True ({err}); medmeta reads only "
            f"files of tensors and plain values, never pickled code"
        ) from err
