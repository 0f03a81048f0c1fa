"""One lock per run folder or dataset: two processes never write the same files at once.

A run (``medmeta-train``, ``medmeta-evaluate``, :func:`medmeta.training.fit.fit` with a run
folder) holds ``<run folder>/.medmeta.lock`` while it runs, and the dataset writer holds
``<data root>/.<dataset id>.lock`` while it builds and moves a dataset into place. The lock is an
``fcntl.flock`` on that file, so the operating system drops it when the holder dies (a killed run
never leaves a stale lock behind; a finished one removes the file). A second process that finds the lock taken stops at once with
a :class:`~medmeta.errors.BusyError` naming the holder (pid, host, start time, command), which
the holder wrote into the lock file as JSON.

Within one process the lock is re-entrant (an evaluation run and the protocol it runs share a
folder). Where ``fcntl`` does not exist (Windows) locking is skipped.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from medmeta.errors import BusyError

__all__ = ["LOCK_NAME", "hold", "holder_of", "lock_path"]

LOCK_NAME = ".medmeta.lock"
"""The lock file in a run folder."""

_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth), this process only
_guard = threading.Lock()


def lock_path(folder: "str | Path", name: str = LOCK_NAME) -> Path:
    """The lock file ``name`` in ``folder``."""
    return Path(folder) / name


def holder_of(path: "str | Path") -> Optional[dict[str, Any]]:
    """What the lock file at ``path`` says about its holder (``None`` when unreadable or empty)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(info: Optional[dict[str, Any]]) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if isinstance(started, (int, float)) else "?"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"
            + (f" ({info['command']})" if info.get("command") else ""))


@contextmanager
def hold(folder: "str | Path", what: str = "run folder", name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold the lock ``folder/name`` for the block; raise :class:`~medmeta.errors.BusyError`
    (naming ``what``, the folder and the holder) if another live process holds it.

    ``folder`` is created if missing. Yields the lock file's path.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield lock_path(folder, name)
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder, name)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise BusyError(
                        f"{what} {folder} is in use by {_describe(holder_of(path))}: wait for it to finish or "
                        f"choose another folder (the lock {path.name} is released when that process ends)"
                    ) from None
                try:  # the holder we waited for may have removed the file: lock the one on disk
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            _held[key] = (fd, 1)
    try:
        yield path
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                try:
                    path.unlink(missing_ok=True)  # removed while locked; a waiter re-checks the inode
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
