"""Efficiency per case as FLARE measures it: wall time and memory, a report table, the ranking.

Per case (:func:`measure_case`):

* ``seconds``: wall time of the block (CUDA is synchronised before reading the clock);
* on CUDA: ``cuda_peak_allocated_mb`` / ``cuda_peak_reserved_mb`` (PyTorch's peak counters,
  reset at the start of the case) and a background sampler reading the device's used memory
  (total minus free, what ``nvidia-smi`` reports and FLARE sampled) every 0.1 s, giving
  ``memory_max_mb`` and ``memory_auc_mb_s``, the area under the memory-time curve (FLARE 2022's
  official measure; FLARE 2021 ranked on the maximum);
* on CPU: ``peak_rss_mb``, the peak resident memory of this process during the case (Linux:
  the ``VmHWM`` high-water mark, reset per case through ``/proc/self/clear_refs`` after freed
  heap memory is returned with ``malloc_trim``; elsewhere ``ru_maxrss`` when the case set a new
  lifetime peak, else the sampler's maximum), and the same
  sampler on resident memory for ``memory_max_mb`` / AUC; ``memory_start_mb`` is the resident
  memory when the case starts, so ``peak_rss_mb - memory_start_mb`` is what the case added.
  ``tracemalloc`` is not used: it does not see tensor memory.

:func:`efficiency_table` makes the per-case table with an ``overall`` row, and
:func:`flare_ranking` ranks methods per case on each criterion (mean Dice, mean NSD, time,
memory) and averages the ranks, as FLARE did, using :mod:`medmeta.evaluation.ranking`.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from medmeta.evaluation.ranking import task_ranks
from medmeta.evaluation.reports import write_csv
from medmeta.io import write_bytes_atomic

__all__ = [
    "MB",
    "CaseEfficiency",
    "MemorySampler",
    "measure_case",
    "EfficiencyMonitor",
    "efficiency_table",
    "markdown_table",
    "write_efficiency_report",
    "flare_ranking",
    "FLARE_CRITERIA",
]

MB = 2**20

FLARE_CRITERIA: dict[str, bool] = {"dice_mean": True, "nsd_mean": True, "seconds": False, "memory_max_mb": False}
"""FLARE's ranking criteria: column -> higher is better."""


@dataclass
class CaseEfficiency:
    """Time and memory of one case (memory in MiB; NaN where a measure does not apply)."""

    case: str
    device: str
    seconds: float = math.nan
    memory_max_mb: float = math.nan
    memory_start_mb: float = math.nan
    memory_auc_mb_s: float = math.nan
    peak_rss_mb: float = math.nan
    cuda_peak_allocated_mb: float = math.nan
    cuda_peak_reserved_mb: float = math.nan
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def _rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


def _read_hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status", "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _lifetime_peak_bytes() -> int:
    """The process's peak resident memory since it started (``ru_maxrss``)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return 0


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Hand memory that was freed but kept by the C allocator back to the system (glibc's
    ``malloc_trim``), so a case's resident memory starts from what is live, not from what an
    earlier case once held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _cuda_used_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


class MemorySampler:
    """Samples ``probe()`` (bytes) every ``interval`` seconds in a daemon thread.

    ``start()`` takes a first sample, ``stop()`` a last one; ``max_mb`` and ``auc_mb_s`` (the
    trapezoid area under memory over time) summarise them.
    """

    def __init__(self, probe: Callable[[], int], interval: float = 0.1) -> None:
        if interval <= 0:
            raise ValueError(f"interval: expected a positive sampling period in seconds, got {interval}")
        self.probe = probe
        self.interval = float(interval)
        self.times: list[float] = []
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        self.times.append(time.perf_counter())
        self.values.append(int(self.probe()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "MemorySampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, name="medmeta-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def start_mb(self) -> float:
        return self.values[0] / MB if self.values else math.nan

    @property
    def max_mb(self) -> float:
        return max(self.values) / MB if self.values else math.nan

    @property
    def auc_mb_s(self) -> float:
        if len(self.values) < 2:
            return 0.0
        t = np.asarray(self.times) - self.times[0]
        v = np.asarray(self.values, dtype=np.float64) / MB
        return float(np.sum((v[1:] + v[:-1]) * np.diff(t)) / 2)


@contextmanager
def measure_case(
    case: str, device: "str | torch.device | None" = None, interval: float = 0.1
) -> Iterator[CaseEfficiency]:
    """Measure the time and memory of the ``with`` block as one case (see module doc); the
    yielded :class:`CaseEfficiency` is filled in when the block ends."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    result = CaseEfficiency(case=str(case), device=str(dev))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        sampler = MemorySampler(lambda: _cuda_used_bytes(dev), interval)
    else:
        _release_freed_memory()
        hwm_reset = _reset_hwm()
        lifetime_peak = _lifetime_peak_bytes()
        sampler = MemorySampler(_rss_bytes, interval)
    sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - start
        sampler.stop()
        result.memory_max_mb = sampler.max_mb
        result.memory_start_mb = sampler.start_mb
        result.memory_auc_mb_s = sampler.auc_mb_s
        result.samples = len(sampler.values)
        if cuda:
            result.cuda_peak_allocated_mb = torch.cuda.max_memory_allocated(dev) / MB
            result.cuda_peak_reserved_mb = torch.cuda.max_memory_reserved(dev) / MB
        else:
            hwm = _read_hwm_bytes() if hwm_reset else None
            if hwm is None:  # no per-case mark: a new lifetime peak, if one was set, fell in this case
                end_peak = _lifetime_peak_bytes()
                hwm = end_peak if end_peak > lifetime_peak else None
            result.peak_rss_mb = max(hwm / MB, sampler.max_mb) if hwm is not None else sampler.max_mb


class EfficiencyMonitor:
    """Collects :class:`CaseEfficiency` records: ``with monitor.measure("case_001"): ...``."""

    def __init__(self, device: "str | torch.device | None" = None, interval: float = 0.1) -> None:
        self.device = device
        self.interval = interval
        self.cases: list[CaseEfficiency] = []

    @contextmanager
    def measure(self, case: str, **extra: Any) -> Iterator[CaseEfficiency]:
        with measure_case(case, self.device, self.interval) as result:
            result.extra.update(extra)
            yield result
        self.cases.append(result)

    def table(self) -> pd.DataFrame:
        return efficiency_table(self.cases)


def efficiency_table(cases: Sequence["CaseEfficiency | Mapping[str, Any]"], overall: bool = True) -> pd.DataFrame:
    """One row per case, then an ``overall`` row: total and mean seconds in ``seconds`` /
    ``mean_seconds``, the maximum of every memory column, the total of the memory-time areas and
    of the counts (``samples``, ``slices``), the mean of score columns (infinities left out)."""
    rows = [c.row() if isinstance(c, CaseEfficiency) else dict(c) for c in cases]
    df = pd.DataFrame(rows)
    if not overall or df.empty:
        return _tidy(df) if not df.empty else df
    summary: dict[str, Any] = {"case": "overall"}
    for col in df.columns:
        if col == "case":
            continue
        values = df[col]
        if col == "seconds":
            summary["seconds"] = float(values.sum())
            summary["mean_seconds"] = float(values.mean())
        elif col.endswith("_mb"):
            summary[col] = float(values.max())
        elif col.endswith("_mb_s"):
            summary[col] = float(values.sum())
        elif col in _COUNT_COLUMNS:
            summary[col] = int(values.sum())
        elif pd.api.types.is_numeric_dtype(values):
            finite = values.replace([np.inf, -np.inf], np.nan)
            summary[col] = float(finite.mean())
        else:
            uniq = values.dropna().unique()
            summary[col] = uniq[0] if len(uniq) == 1 else ""
    out = pd.concat([df, pd.DataFrame([summary])], ignore_index=True)
    return _tidy(out)


_COUNT_COLUMNS = ("samples", "slices")
_FIRST_COLUMNS = ("case", "method", "device", "seconds", "mean_seconds")


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Counts as nullable integers, the key columns first."""
    for col in _COUNT_COLUMNS:
        if col in df.columns:
            df[col] = df[col].astype("Int64")
    first = [c for c in _FIRST_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A pandas table as GitHub Markdown (floats to ``digits`` decimals, NaN as ``n/a``)."""
    def cell(v: Any) -> str:
        if v is pd.NA:
            return "n/a"
        if isinstance(v, (float, np.floating)):
            return "n/a" if math.isnan(v) else f"{float(v):.{digits}f}"
        return str(v).replace("|", "\\|")

    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_efficiency_report(df: pd.DataFrame, out_dir: "str | Path", stem: str = "efficiency",
                            title: str = "Efficiency per case") -> dict[str, Path]:
    """``<stem>.csv`` and ``<stem>.md`` in ``out_dir``, both written atomically."""
    out_dir = Path(out_dir)
    csv = write_csv(df, out_dir / f"{stem}.csv")
    text = f"# {title}\n\nTime in seconds, memory in MiB, area under the memory-time curve in MiB s.\n\n"
    md = write_bytes_atomic(out_dir / f"{stem}.md", (text + markdown_table(df) + "\n").encode("utf-8"))
    return {"csv": csv, "markdown": md}


def flare_ranking(
    df: pd.DataFrame,
    criteria: Optional[Mapping[str, bool]] = None,
    method_col: str = "method",
    case_col: str = "case",
) -> pd.DataFrame:
    """Rank methods per case on each criterion (column -> higher is better; default mean Dice,
    mean NSD, seconds, memory maximum) and average all the ranks (ties share the mean rank).

    Returns ``method, mean_rank`` and ``rank_<criterion>`` (the mean rank on that criterion),
    best first. Rows whose case is ``overall`` are ignored; every method needs every case.
    """
    criteria = dict(FLARE_CRITERIA if criteria is None else criteria)
    if not criteria:
        raise ValueError("criteria: give at least one column to rank on")
    table = df[df[case_col].astype(str) != "overall"] if case_col in df.columns else df
    per_criterion = []
    for col, higher in criteria.items():
        if col not in table.columns:
            raise ValueError(f"flare_ranking: column {col!r} is missing; the table has {list(table.columns)}")
        ranks = task_ranks(table, score=col, higher_is_better=bool(higher), method_col=method_col, task_cols=[case_col])
        per_criterion.append(ranks[[case_col, method_col, "rank"]].assign(criterion=col))
    ranks = pd.concat(per_criterion, ignore_index=True)
    out = ranks.groupby(method_col)["rank"].mean().rename("mean_rank").to_frame()
    for col in criteria:
        out[f"rank_{col}"] = ranks[ranks["criterion"] == col].groupby(method_col)["rank"].mean()
    out = out.reset_index().rename(columns={method_col: "method"})
    return out.sort_values(["mean_rank", "method"], kind="stable").reset_index(drop=True)
