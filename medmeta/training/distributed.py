"""Data-parallel meta-training on plain ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Why not wrap the learner in ``DistributedDataParallel``: MAML-style learners run their inner
loop through ``torch.func.functional_call``, which bypasses DDP's gradient hooks without any
error, so replicas would drift apart silently. Instead every rank computes the meta-gradient
of its own episodes with plain autograd and :func:`all_reduce_gradients` sums the ``.grad``
tensors across ranks explicitly (one flat buffer per dtype and device, one collective).

Episodes are sharded by rank: within each meta-batch, global episode ``k`` goes to rank
``k % world_size`` (see :class:`medmeta.episodes.EpisodeStream`). Each rank scales its
episode losses by ``1 / meta_batch_size`` (the *global* batch), so the summed gradient is the
average over the whole meta-batch: the same as one process running all episodes.

Process groups are started from the usual environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) set by ``torchrun``, or exported from a
submitit job (Slurm or local executor with ``tasks_per_node > 1``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medmeta.errors import ConfigError

__all__ = [
    "DistributedContext",
    "init_distributed",
    "resolve_device",
    "all_reduce_gradients",
    "all_reduce_sum",
    "average_buffers",
    "broadcast_module",
    "replicas_identical",
    "broadcast_object",
]


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: the local rank's GPU when CUDA is available, else CPU; or an explicit device."""
    pref = str(preference).strip().lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but CUDA is not available; use trainer.device=cpu or auto")
        index = local_rank if torch.cuda.device_count() > 1 else 0
        return torch.device("cuda", index)
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise ValueError(f"trainer.device: expected auto, cpu, cuda or cuda:N, got {preference!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={preference} but CUDA is not available; use trainer.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"trainer.device={preference} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


@dataclass
class DistributedContext:
    """Where this process stands: rank, world size, its device, and who owns the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _export_submitit_environment() -> None:
    """Inside a submitit job with several tasks, export the torch.distributed variables."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # pragma: no cover - submitit sets SUBMITIT_EXECUTOR itself
        return
    try:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())
    except RuntimeError:  # not actually inside a submitit job
        return


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistributedContext:
    """Start (or join) the process group described by the environment; one process otherwise.

    ``backend="auto"`` picks NCCL for CUDA devices and gloo for CPU.
    """
    _export_submitit_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, dev, None, False)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"trainer.dist_backend: expected auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("trainer.dist_backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={world_size} but {var} is not set; start distributed runs with torchrun "
                f"(see docs/distributed.md)"
            )
    owns = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=int(timeout_s))}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, owns)


def _grouped(tensors: Iterable[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def all_reduce_gradients(parameters: Iterable[nn.Parameter], ctx: DistributedContext, average: bool = False) -> None:
    """Sum (or with ``average=True`` average) ``.grad`` of ``parameters`` across ranks, in place.

    A parameter without a gradient on one rank (no episode of that rank touched it) takes part
    with zeros; it keeps ``grad=None`` only if no rank produced a gradient for it, so optimisers
    skip exactly the parameters a single process would skip.
    """
    params = [p for p in parameters if p.requires_grad]
    if not ctx.enabled or not params:
        return
    device = ctx.device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad)
    for p, flag in zip(params, has_grad.tolist()):
        if flag > 0 and p.grad is None:
            p.grad = torch.zeros_like(p)
    with_grad = [p.grad for p in params if p.grad is not None]
    for tensors in _grouped(with_grad).values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        if average:
            flat /= ctx.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_reduce_sum(values: Iterable[float], ctx: DistributedContext) -> list[float]:
    """Sum a few Python floats across ranks (metrics, counts)."""
    values = [float(v) for v in values]
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def average_buffers(module: nn.Module, ctx: DistributedContext) -> None:
    """Average floating-point buffers (BatchNorm running statistics) so replicas stay identical;
    integer buffers (``num_batches_tracked``) are taken from rank 0."""
    if not ctx.enabled:
        return
    buffers = list(module.buffers())
    floats = [b for b in buffers if b.is_floating_point()]
    ints = [b for b in buffers if not b.is_floating_point()]
    for tensors in _grouped(floats).values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    for t in ints:
        dist.broadcast(t, src=0)


def broadcast_module(module: nn.Module, ctx: DistributedContext, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every rank (identical start)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def replicas_identical(module: nn.Module, ctx: DistributedContext) -> bool:
    """True when every rank holds exactly the same parameters (a cheap checksum comparison)."""
    if not ctx.enabled:
        return True
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()] or [torch.zeros((), dtype=torch.float64)])
        sums = sums.to(ctx.device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def broadcast_object(obj: Any, ctx: DistributedContext, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (small things: paths, decisions)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]
