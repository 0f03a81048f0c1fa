"""Peak tensor memory of a block of code, on the CPU as on CUDA.

``torch.cuda.max_memory_allocated`` counts the bytes of live CUDA tensors; the CPU has no such
counter, and the resident set size a process reports also holds allocator caches, code and the
memory of everything else the process did, and moves by megabytes between identical runs. On
the CPU, :func:`track_peak_memory` replays the allocation and free events of the CPU allocator
that ``torch.profiler`` records (``profile_memory=True``) in order, which gives the same count
as the CUDA counter. Used by the benchmarks to compare the memory of two implementations, and by
tests of properties such as "a first-order inner loop does not grow with its number of steps".
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Union

import torch

__all__ = ["PeakMemory", "track_peak_memory"]


@dataclass
class PeakMemory:
    """Filled in when the ``with track_peak_memory(...)`` block ends."""

    #: peak bytes of live tensors during the block, above what was live when it started
    bytes: int = 0

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


@contextmanager
def track_peak_memory(device: Union[str, torch.device] = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak tensor memory that the block allocates on ``device`` (CPU or CUDA).

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at the start) above ``memory_allocated`` at
    the start. CPU: the profiler's allocation events, summed in order; tensors freed in the block
    that were allocated before it are not reported by the profiler, so free them before the block
    (e.g. ``optimizer.zero_grad(set_to_none=True)``) when comparing implementations.
    """
    device = torch.device(device)
    peak = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = max(torch.cuda.max_memory_allocated(device) - base, 0)
        return
    if device.type != "cpu":
        raise ValueError(f"track_peak_memory: device must be cpu or cuda, got {device}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peak
    # kineto's raw events keep each allocation as its own '[memory]' event with a signed size
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = 0
    for _, nbytes in events:
        live += nbytes
        peak.bytes = max(peak.bytes, live)
