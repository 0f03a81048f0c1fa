"""Atomic file writes: every file medmeta writes appears whole or not at all.

A run killed mid-write must never leave a half-written checkpoint, result table or dataset file
behind. Each writer goes through a temporary file in the target's folder (same file system),
``fsync`` and ``os.replace``, so readers see the old file or the new one. Temporary files get the
usual ``0666 & ~umask`` permissions (``mkstemp`` alone would make results readable by their owner
only, which breaks shared cluster folders).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]

PathLike = Union[str, Path]


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
