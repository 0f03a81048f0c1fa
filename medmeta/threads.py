"""How many CPU threads one medmeta process gives torch (its intra-op thread pool).

torch starts one intra-op thread per core it sees. Two medmeta processes on one machine (two
runs side by side, torchrun ranks, a main process beside its DataLoader workers) then run more
busy threads than there are cores, and their threads spin at each other's barriers: the jobs slow
each other down many times over (``benchmarks/bench_threads.py``). Every medmeta command
(``medmeta-train``, ``medmeta-evaluate``, ``medmeta-challenge``, ``medmeta-visiomel``,
``medmeta-detect``, ``medmeta-flare``) therefore calls :func:`apply_num_threads` before any work.

The count, first match wins:

1. the app's setting (``trainer.num_threads`` for ``medmeta-train``, ``num_threads`` for
   ``medmeta-evaluate``) when it is a positive integer;
2. ``$MEDMETA_NUM_THREADS`` (a positive integer, or ``auto``);
3. :func:`default_num_threads`: the CPUs this process may use (:func:`available_cpus`: its CPU
   affinity, capped by a cgroup CPU quota) shared among the processes it runs beside:
   ``max(1, cpus // (local_world_size * (1 + workers)))``, with ``workers`` its DataLoader
   workers and ``local_world_size`` torchrun's ``LOCAL_WORLD_SIZE`` (ranks on this machine).

Two independent runs on one machine cannot see each other: give each its share
(``MEDMETA_NUM_THREADS=4`` on 8 cores). The module sits at the package top level, not in
``medmeta.training``, because every command needs it, including those that never train.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from medmeta.errors import ConfigError

__all__ = [
    "THREADS_ENV",
    "apply_num_threads",
    "available_cpus",
    "default_num_threads",
    "local_world_size",
    "resolve_num_threads",
]

log = logging.getLogger(__name__)

THREADS_ENV = "MEDMETA_NUM_THREADS"
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_cpu_limit(root: Path) -> Optional[int]:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up; None: no quota."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period or 100000)))
        for folder in (root / "cpu", root / "cpu,cpuacct"):
            quota_file, period_file = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
            if quota_file.is_file() and period_file.is_file():
                quota_us, period_us = int(quota_file.read_text()), int(period_file.read_text())
                return None if quota_us <= 0 or period_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):  # unreadable or unexpected content: no limit known
        return None
    return None


def available_cpus(cgroup_root: Union[str, Path] = _CGROUP_ROOT) -> int:
    """The CPUs this process may use: its CPU affinity (``os.sched_getaffinity``; ``os.cpu_count``
    where that does not exist), capped by a cgroup CPU quota (containers, Slurm) when one is set."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:  # macOS, Windows
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(Path(cgroup_root))
    return max(1, min(cpus, limit) if limit is not None else cpus)


def _count(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (an int or a string of digits), else a ConfigError naming ``name``."""
    number = value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return number


def local_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """Processes of this job on this machine: torchrun's ``LOCAL_WORLD_SIZE``, 1 without torchrun."""
    env = os.environ if environ is None else environ
    value = env.get("LOCAL_WORLD_SIZE", "")
    return 1 if value == "" else _count(value, "LOCAL_WORLD_SIZE", 1)


def default_num_threads(cpus: int, workers: int = 0, local_world_size: int = 1) -> int:
    """``max(1, cpus // (local_world_size * (1 + workers)))``: each process of the job (every
    torchrun rank on this machine and each rank's DataLoader workers, which torch runs with one
    thread each) gets an equal share of the CPUs."""
    cpus = _count(cpus, "cpus", 1)
    workers = _count(workers, "num_workers", 0)
    local_world_size = _count(local_world_size, "LOCAL_WORLD_SIZE", 1)
    return max(1, cpus // (local_world_size * (1 + workers)))


def resolve_num_threads(
    setting: Union[int, str, None] = None,
    *,
    workers: int = 0,
    name: str = "num_threads",
    environ: Optional[Mapping[str, str]] = None,
    cpus: Optional[int] = None,
) -> tuple[int, str]:
    """The thread count and where it came from (see the module doc for the order).

    ``setting``: the app's value (``None`` or ``"auto"``: not set); ``name`` is what an error
    calls it (``trainer.num_threads``). ``environ`` and ``cpus`` default to this process's.
    A value that is not a positive integer raises :class:`~medmeta.errors.ConfigError` naming it.
    """
    env = os.environ if environ is None else environ
    if setting is not None and not (isinstance(setting, str) and setting.strip().lower() == "auto"):
        return _count(setting, name, 1), f"{name}={setting}"
    raw = env.get(THREADS_ENV, "").strip()
    if raw and raw.lower() != "auto":
        return _count(raw, THREADS_ENV, 1), f"{THREADS_ENV}={raw}"
    cpus = available_cpus() if cpus is None else cpus
    ranks = local_world_size(env)
    n = default_num_threads(cpus, workers, ranks)
    parts = [f"{cpus} CPU(s)"]
    if ranks > 1:
        parts.append(f"{ranks} local ranks")
    if workers:
        parts.append(f"1 + {workers} DataLoader worker(s)")
    return n, "default: " + " / ".join(parts)


def apply_num_threads(setting: Union[int, str, None] = None, *, workers: int = 0, name: str = "num_threads") -> int:
    """Resolve the thread count (:func:`resolve_num_threads`), give it to ``torch.set_num_threads``
    and log it; returns it. Call before any work (the apps do it first thing)."""
    n, source = resolve_num_threads(setting, workers=workers, name=name)
    import torch

    torch.set_num_threads(n)
    log.info("CPU threads: %d (%s)", n, source)
    return n
