"""MAML, FOMAML, ANIL and Meta-SGD meta-training speed and peak memory against the clone-per-task loop.

The baseline is the MAML implementation most research code uses (learn2learn's ``clone_module`` /
``update_module``, higher's patched modules): per task, clone the module's parameters into a copy
of the module (the clones stay in the graph of the originals), take the inner SGD steps with
``torch.autograd.grad(support_loss, clone.parameters(), create_graph=not first_order)``, compute
the query loss with the adapted clone and backpropagate it task by task into the originals. It is
written out below (about forty lines, no learn2learn needed), for each variant:

* MAML: backbone and head adapted, second order; FOMAML: the same, first order;
* ANIL: support and query features computed once, only the head cloned and adapted, second order;
* Meta-SGD: MAML with learned per-element inner rates (cloned with the module, as learn2learn does).

Every method does the same work per meta-iteration on the same episodes: a meta-batch of N-way
K-shot episodes, a new zero-initialised head per task, ``inner_steps`` SGD steps on the support
set, transductive BatchNorm (batch statistics; running statistics updated from the support set:
the baseline's clone shares the buffers, so its train-mode forward passes update them, medmeta
runs with ``update_running_stats=True``), the query loss, backward, one outer Adam step.
medmeta runs ``learner.meta_backward(meta_batch)``, what its training loop calls.

Before timing, the parent checks in float64 on a small Conv-4 that every medmeta method's
meta-gradient equals the baseline's (max relative difference printed). Speed: for each
configuration one process (on CPU a fresh child process, on CUDA the parent) builds every
implementation and runs alternating blocks of a few meta-iterations each (order reversed every
other block), so load from other processes hits all alike; the table gives the median episodes/s
and the median of the per-block ratios. On CPU the clock is the process's CPU time with one torch
thread (``--threads``), since on a shared machine wall time mostly measures the other processes;
on CUDA it is wall time.
Memory: peak tensor memory of two meta-iterations above what was allocated before them, for each
implementation in turn: ``torch.cuda.max_memory_allocated`` on CUDA, the same count from the
profiler's CPU allocation events on the CPU (``medmeta.memory.track_peak_memory``). It counts live tensors, as
the methods differ, not allocator caches or the process's resident memory, which moved by
several MiB from run to run on the shared machine.

With ``--device cuda`` medmeta's ``vmap=True`` (tasks of equal shape batched into one inner
loop) is also run against medmeta's loop.

    python benchmarks/bench_maml.py --quick                          # Conv-4 only, 3 blocks
    python benchmarks/bench_maml.py                                  # Conv-4 and ResNet-18
    python benchmarks/bench_maml.py --backbones resnet18 --blocks 1 --iterations 2
    python benchmarks/bench_maml.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from medmeta.backbones import create_backbone
from medmeta.backbones.conv4 import Conv4
from medmeta.learners.heads import task_loss
from medmeta.learners.maml import ANIL, FOMAML, MAML, MetaSGD
from medmeta.memory import track_peak_memory
from medmeta.modes import cpu_channels_last
from medmeta.tasks import Episode, TaskDescription, TaskTarget

METHODS = ("MAML", "FOMAML", "ANIL", "Meta-SGD")
LEARNERS = {"MAML": MAML, "FOMAML": FOMAML, "ANIL": ANIL, "Meta-SGD": MetaSGD}
INNER_LR = 0.1

BACKBONES: dict[str, dict[str, Any]] = {
    # Conv-4 with 32 channels at 28 px, 5-way 5-shot 15-query, meta-batch 4 (issue 15)
    "conv4": dict(image_size=28, way=5, shot=5, query=15, meta_batch=4, iterations=2, warmup=1),
    # ResNet-18 at 84 px; smaller episodes so that it runs in minutes on two loaded cores
    "resnet18": dict(image_size=84, way=5, shot=1, query=5, meta_batch=2, iterations=1, warmup=1),
}


def make_backbone(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "conv4":  # medmeta's Conv-4 with 32 channels (the registered ones have 64 and 16)
            backbone = create_backbone("medmeta_conv4_tiny")
            backbone.model = Conv4(in_chans=3, num_classes=0, width=32)
            backbone.num_features = 32
        else:
            backbone = create_backbone(name)
    return backbone.to(device=device, dtype=dtype)


def make_episodes(cfg: dict[str, Any], device: torch.device, batches: int = 2, dtype: torch.dtype = torch.float32) -> list[list[Episode]]:
    """Meta-batches of random N-way K-shot episodes (class-dependent means, so tasks are learnable)."""
    g = torch.Generator().manual_seed(0)
    desc = TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, tuple(f"c{i}" for i in range(cfg["way"])), "bench: task", "bench")
    size, way = cfg["image_size"], cfg["way"]

    def part(k: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(way).repeat_interleave(k)
        means = torch.randn(way, 3, 1, 1, generator=g)
        images = means[labels] + torch.randn(len(labels), 3, size, size, generator=g)
        return images.to(device=device, dtype=dtype), labels.to(device)

    out = []
    for _ in range(batches):
        batch = []
        for _ in range(cfg["meta_batch"]):
            sx, sy = part(cfg["shot"])
            qx, qy = part(cfg["query"])
            batch.append(Episode(sx, sy, qx, qy, desc))
        out.append(batch)
    return out


# -- the baseline: clone the module per task, plain autograd (learn2learn's clone_module/update_module) --
def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are ``p.clone()`` (in the graph of ``p``); buffers shared."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}  # type: ignore[misc]
    clone._buffers = module._buffers.copy()
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}  # type: ignore[assignment]
    return clone


def update_module(module: nn.Module, updates: dict[int, Tensor]) -> None:
    """Replace every parameter ``p`` by ``updates[id(p)]`` in place, in every submodule."""
    for k, p in module._parameters.items():
        if p is not None and id(p) in updates:
            module._parameters[k] = updates[id(p)]  # type: ignore[assignment]
    for m in module._modules.values():
        if m is not None:
            update_module(m, updates)


class BaselineLearner(nn.Module):
    """The clone-per-task loop for MAML / FOMAML / ANIL / Meta-SGD with a new zero head per task."""

    def __init__(self, backbone: Any, method: str, inner_steps: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features: int = backbone.num_features
        self.method = method
        self.inner_steps = inner_steps
        self.first_order = method == "FOMAML"
        if method == "Meta-SGD":
            self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p, INNER_LR)) for p in backbone.parameters()])
            ref = next(backbone.parameters())
            self.head_lrs = nn.ParameterList([
                nn.Parameter(torch.full((1, self.num_features), INNER_LR, dtype=ref.dtype, device=ref.device)),
                nn.Parameter(torch.full((1,), INNER_LR, dtype=ref.dtype, device=ref.device)),
            ])

    def _head(self, ep: Episode) -> nn.Linear:
        ref = ep.support_images
        head = nn.Linear(self.num_features, ep.description.num_outputs).to(device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def _adapt(self, learner: nn.Module, loss: Tensor, lrs: Optional[list[Tensor]]) -> None:
        params = list(learner.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=not self.first_order, allow_unused=True)
        updates = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None:
                updates[id(p)] = p - (INNER_LR if lrs is None else lrs[i]) * g
        update_module(learner, updates)

    def task_loss(self, ep: Episode) -> Tensor:
        target = ep.description.task_target
        self.backbone.train()
        if self.method == "ANIL":
            support, query = self.backbone(ep.support_images), self.backbone(ep.query_images)
            learner = clone_module(self._head(ep))
            for _ in range(self.inner_steps):
                self._adapt(learner, task_loss(learner(support), ep.support_labels, target), None)
            return task_loss(learner(query), ep.query_labels, target)
        learner = clone_module(nn.Sequential(self.backbone, self._head(ep)))
        lrs = [*self.lrs, *self.head_lrs] if self.method == "Meta-SGD" else None
        for _ in range(self.inner_steps):
            self._adapt(learner, task_loss(learner(ep.support_images), ep.support_labels, target), lrs)
        return task_loss(learner(ep.query_images), ep.query_labels, target)

    def meta_backward(self, episodes: list[Episode]) -> Tensor:
        # the memory layout medmeta's MAML picks for the same work (Conv-4 runs channels-last on the
        # CPU, except for second order through the backbone at two or more steps), so that both sides
        # run the same kernels
        second_order = self.method in ("MAML", "Meta-SGD") and self.inner_steps >= 2
        total = torch.zeros(())
        with cpu_channels_last(not second_order):
            for ep in episodes:
                loss = self.task_loss(ep)
                (loss / len(episodes)).backward()
                total += float(loss.detach())
        return total / len(episodes)


def make_learner(impl: str, method: str, backbone: nn.Module, inner_steps: int) -> Any:
    """``impl``: "baseline", "medmeta" (loop) or "medmeta-vmap"."""
    if impl == "baseline":
        return BaselineLearner(backbone, method, inner_steps)
    return LEARNERS[method](backbone, inner_steps=inner_steps, inner_lr=INNER_LR, vmap=impl == "medmeta-vmap")


class MetaStep:
    """One meta-iteration, as the training loop runs it: zero the gradients, ``meta_backward``, Adam step."""

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def __call__(self, episodes: list[Episode]) -> None:
        self.optimizer.zero_grad()
        self.learner.meta_backward(episodes)
        self.optimizer.step()


# -- measurement in a child process ------------------------------------------------------------------
def _setup(spec: dict[str, Any], impl: str, device: torch.device):
    cfg = {**BACKBONES[spec["backbone"]], **spec.get("overrides", {})}
    backbone = make_backbone(spec["backbone"], device)
    return cfg, backbone, MetaStep(make_learner(impl, spec["method"], backbone, spec["steps"]))


def _clock(device: torch.device) -> float:
    """CPU: this process's CPU time (robust to other processes' load; run with 1 thread); CUDA: wall time."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_time(spec: dict[str, Any], impls: list[str], device: torch.device) -> dict[str, Any]:
    """Seconds per meta-iteration of every implementation, in alternating blocks in this process
    (``"seconds"``: impl -> one value per block), and each one's peak memory (``"peak_mib"``).

    Block ``b`` runs ``iterations`` meta-iterations of each implementation in turn (the order
    reversed every other block), so that load from other processes hits all of them alike.
    Memory: two meta-iterations of one implementation after the timing, their peak tensor memory
    above what was allocated before them (every implementation's weights and optimiser state;
    :func:`medmeta.memory.track_peak_memory`), with the previous gradients released first.
    """
    runs = {impl: _setup(spec, impl, device) for impl in impls}
    cfg = runs[impls[0]][0]
    batches = make_episodes(cfg, device)
    for impl in impls:  # warm-up
        for i in range(cfg["warmup"]):
            runs[impl][2](batches[i % len(batches)])
    out: dict[str, list[float]] = {impl: [] for impl in impls}
    for block in range(spec["blocks"]):
        for impl in impls if block % 2 == 0 else impls[::-1]:
            step = runs[impl][2]
            _sync(device)
            t0 = _clock(device)
            for i in range(cfg["iterations"]):
                step(batches[i % len(batches)])
            _sync(device)
            out[impl].append((_clock(device) - t0) / cfg["iterations"])
    peak_mib: dict[str, float] = {}
    for impl in impls:
        step = runs[impl][2]
        step.optimizer.zero_grad(set_to_none=True)

        with track_peak_memory(device) as peak:
            for i in range(2):
                step(batches[i % len(batches)])
        peak_mib[impl] = peak.mib
    return {"seconds": out, "peak_mib": peak_mib}


def run_child(spec: dict[str, Any], args: argparse.Namespace) -> Optional[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--device", args.device]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"# {spec}: failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- the equivalence check ---------------------------------------------------------------------------
def check_gradients(device: torch.device) -> dict[str, float]:
    """Max relative difference of medmeta's meta-gradient from the baseline's (float64, small Conv-4)."""
    cfg = dict(image_size=16, way=3, shot=2, query=3, meta_batch=2)
    episodes = make_episodes(cfg, device, batches=1, dtype=torch.float64)[0]
    out = {}
    for method in METHODS:
        for steps in (1, 3):
            grads = []
            for impl in ("baseline", "medmeta"):
                learner = make_learner(impl, method, make_backbone("conv4", device, torch.float64), steps)
                learner.meta_backward(episodes)
                grads.append(torch.cat([p.grad.flatten() for p in learner.backbone.parameters()]))
            out[f"{method}, {steps} steps"] = float((grads[1] - grads[0]).abs().max() / grads[0].abs().max())
    return out


def table_row(
    backbone: str, method: str, steps: int, seconds: dict[str, list[float]], peak_mib: dict[str, float],
    meta_batch: int, device: torch.device,
) -> str:
    """One markdown row: episodes/s (median over blocks), the median per-block speed ratio, peak memory."""

    def eps(impl: str) -> float:
        return meta_batch / statistics.median(seconds[impl])

    def ratio(impl: str, ref: str) -> float:
        return statistics.median(r / o for r, o in zip(seconds[ref], seconds[impl]))

    def mib(impl: str) -> str:
        return f"{peak_mib[impl]:.1f}" if impl in peak_mib else "failed"

    row = (f"| {backbone} | {method} | {steps} | {eps('baseline'):.2f} | {eps('medmeta'):.2f} | "
           f"{ratio('medmeta', 'baseline'):.2f}x | {mib('baseline')} | {mib('medmeta')} |")
    if "medmeta-vmap" in seconds:
        row += f" {eps('medmeta-vmap'):.2f} | {ratio('medmeta-vmap', 'medmeta'):.2f}x | {mib('medmeta-vmap')} |"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Conv-4 only, 3 blocks")
    p.add_argument("--backbones", default=None, help="comma-separated from " + ", ".join(BACKBONES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated from " + ", ".join(METHODS))
    p.add_argument("--steps", default="1,5", help="inner steps, comma-separated")
    p.add_argument("--blocks", type=int, default=None, help="alternating baseline/medmeta blocks (default 5, quick 3)")
    p.add_argument("--iterations", type=int, default=None, help="timed meta-iterations per child (default per backbone)")
    p.add_argument("--meta-batch", type=int, default=None, help="episodes per meta-iteration (default per backbone)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each child (CPU default 1: CPU time is measured)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_time(spec, spec["impls"], torch.device(args.device))))
        return
    device = torch.device(args.device)
    if device.type == "cpu" and not args.threads:
        args.threads = 1
        torch.set_num_threads(1)
    backbones = (args.backbones or ("conv4" if args.quick else "conv4,resnet18")).split(",")
    methods = args.methods.split(",")
    blocks = args.blocks or (3 if args.quick else 5)
    impls = ["baseline", "medmeta"] + (["medmeta-vmap"] if device.type == "cuda" else [])
    overrides = {k: v for k, v in (("iterations", args.iterations), ("meta_batch", args.meta_batch)) if v is not None}
    checks = check_gradients(device)
    configs = [(b, m, int(s)) for b in backbones for m in methods for s in args.steps.split(",")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    mem_name = f"peak {'CUDA' if device.type == 'cuda' else 'CPU'} tensor MiB"
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"# MAML family meta-training on {args.device} ({where}, {clock}), transductive BatchNorm, zero head per task, "
          f"inner lr {INNER_LR}. Speed: {blocks} alternating blocks in one process per configuration, median of the "
          f"per-block ratios; memory: peak tensor memory of two meta-iterations above what was allocated before them")
    for b in backbones:
        c = {**BACKBONES[b], **overrides}
        print(f"# {b}: {c['image_size']} px, {c['way']}-way {c['shot']}-shot {c['query']}-query, meta-batch "
              f"{c['meta_batch']}, {c['iterations']} meta-iterations per block after {c['warmup']} warm-up")
    extra = f" medmeta vmap ep/s | vmap / loop | vmap {mem_name} |" if "medmeta-vmap" in impls else ""
    print(f"| backbone | method | inner steps | baseline ep/s | medmeta ep/s | medmeta / baseline | "
          f"baseline {mem_name} | medmeta {mem_name} |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if extra else ""), flush=True)
    for b, m, s in configs:  # each row printed when measured, so a time-boxed run keeps what it measured
        spec = dict(backbone=b, method=m, steps=s, overrides=overrides, blocks=blocks, impls=impls)
        if device.type == "cuda":  # in this process: CUDA memory is per implementation there too (child_time)
            res: Optional[dict[str, Any]] = child_time(spec, impls, device)
        else:
            res = run_child(spec, args)
        if res is None:
            print(f"| {b} | {m} | {s} | failed | | | | |", flush=True)
            continue
        print(table_row(b, m, s, res["seconds"], res["peak_mib"], {**BACKBONES[b], **overrides}["meta_batch"], device), flush=True)
    print("\nmeta-gradient check (float64, Conv-4 16 px, 3-way 2-shot, meta-batch 2), max |medmeta - baseline| / max |baseline|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))


if __name__ == "__main__":
    main()
