"""Meta-training speed and peak memory of the MAML family against a plain deep-copy loop.

Every method does the same work per meta-iteration: a meta-batch of N-way K-shot episodes, a
new zero-initialised head per task, ``inner_steps`` SGD steps on the support set, the query
loss, backward, and an outer Adam step. Compared, in the same run and on the same episodes:

* ``deepcopy loop``: the obvious alternative: ``copy.deepcopy`` the backbone for every task,
  adapt the copy with ``torch.optim.SGD``, backpropagate the query loss on the copy and add the
  copy's gradients to the meta-parameters (first order: a copied module keeps no graph to the
  original, so this is what a plain loop can compute);
* medmeta's ``torch.func`` learners: MAML (second order), FOMAML, ANIL (second order through
  the head's inner loop), each as a loop over tasks with one backward of ``meta_loss`` (every
  task's graph alive at once), as a loop with ``meta_backward`` (one backward per task, graphs
  freed task by task), and with ``vmap=True`` (one batched inner loop for tasks of equal shape).

Each measurement runs in a fresh child process. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above what setup allocated; on CPU the child's peak resident
set size (``VmHWM``) above its resident size after setup and one plain forward/backward pass
(which maps the kernels' code, a fixed cost of a few hundred MiB that is not the method's). Before timing, the parent checks
that FOMAML's meta-gradient equals the deep-copy loop's and that vmap gives the loop's loss.

    python benchmarks/bench_maml.py --quick
    python benchmarks/bench_maml.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

from medmeta.backbones import create_backbone
from medmeta.learners.heads import task_loss
from medmeta.learners.maml import ANIL, FOMAML, MAML
from medmeta.tasks import Episode, TaskDescription

METHODS = {  # learner class, vmap, backward task by task (meta_backward) instead of meta_loss().backward()
    "deepcopy loop (first order)": None,
    "MAML (second order)": (MAML, False, False),
    "FOMAML": (FOMAML, False, False),
    "ANIL": (ANIL, False, False),
    "MAML (second order), task-by-task backward": (MAML, False, True),
    "FOMAML, task-by-task backward": (FOMAML, False, True),
    "ANIL, task-by-task backward": (ANIL, False, True),
    "MAML (second order), vmap": (MAML, True, False),
    "FOMAML, vmap": (FOMAML, True, False),
    "ANIL, vmap": (ANIL, True, False),
}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(backbone="medmeta_conv4_tiny", image_size=28, way=5, shot=5, query=5, meta_batch=4,
                    inner_steps=4, iterations=5, warmup=1)
    return dict(backbone="medmeta_conv4", image_size=84, way=5, shot=5, query=15, meta_batch=8,
                inner_steps=4, iterations=10, warmup=2)


def make_episodes(cfg: dict[str, Any], device: torch.device, batches: int = 2) -> list[list[Episode]]:
    """Meta-batches of random N-way K-shot episodes (class-dependent mean, so tasks are learnable)."""
    g = torch.Generator().manual_seed(0)
    desc = TaskDescription("MULTICLASS_CLASSIFICATION", tuple(f"c{i}" for i in range(cfg["way"])), "bench: task", "bench")
    size, way = cfg["image_size"], cfg["way"]

    def part(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(way).repeat_interleave(k)
        means = torch.randn(way, 3, 1, 1, generator=g)
        images = means[labels] + torch.randn(len(labels), 3, size, size, generator=g)
        return images.to(device), labels.to(device)

    out = []
    for _ in range(batches):
        batch = []
        for _ in range(cfg["meta_batch"]):
            sx, sy = part(cfg["shot"])
            qx, qy = part(cfg["query"])
            batch.append(Episode(sx, sy, qx, qy, desc))
        out.append(batch)
    return out


def make_backbone(cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(cfg["backbone"]).to(device)


def deepcopy_meta_gradient(backbone: torch.nn.Module, episodes: list[Episode], inner_steps: int, inner_lr: float) -> float:
    """The plain loop: deep-copy per task, SGD on the copy, add the copy's query gradients."""
    total = 0.0
    for ep in episodes:
        model = copy.deepcopy(backbone)
        model.train()
        head = torch.nn.Linear(backbone.num_features, ep.description.num_outputs).to(ep.support_images.device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=inner_lr)
        for _ in range(inner_steps):
            opt.zero_grad()
            task_loss(head(model(ep.support_images)), ep.support_labels, ep.description.task_target).backward()
            opt.step()
        opt.zero_grad()
        loss = task_loss(head(model(ep.query_images)), ep.query_labels, ep.description.task_target) / len(episodes)
        loss.backward()
        for p, q in zip(backbone.parameters(), model.parameters()):
            p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
        total += float(loss.detach())
    return total


def make_step(method: str, cfg: dict[str, Any], backbone: torch.nn.Module):
    """A function running one meta-iteration (forward, backward, outer Adam step)."""
    spec = METHODS[method]
    if spec is None:
        opt = torch.optim.Adam(backbone.parameters(), lr=1e-3)

        def step(episodes: list[Episode]) -> None:
            opt.zero_grad()
            deepcopy_meta_gradient(backbone, episodes, cfg["inner_steps"], 0.1)
            opt.step()

        return step
    cls, use_vmap, per_task = spec
    learner = cls(backbone, inner_steps=cfg["inner_steps"], inner_lr=0.1, vmap=use_vmap, update_running_stats=False)
    learner.train()
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(episodes: list[Episode]) -> None:
        opt.zero_grad()
        if per_task:
            learner.meta_backward(episodes)
        else:
            learner.meta_loss(episodes).backward()
        opt.step()

    return step


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc.

    ``VmHWM`` belongs to the process image, unlike ``getrusage``'s ``ru_maxrss``, which Linux
    carries across ``execve`` and so would include the (large) parent that forked the child.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (peak RSS needs Linux)")


def child(method: str, cfg: dict[str, Any], device_name: str) -> dict[str, float]:
    """Time one method in this (fresh) process; peak memory above the state after setup."""
    device = torch.device(device_name)
    backbone = make_backbone(cfg, device)
    batches = make_episodes(cfg, device)
    step = make_step(method, cfg, backbone)
    cuda = device.type == "cuda"
    # prime: one plain forward/backward loads kernels and code pages, so the CPU baseline below
    # holds the process's fixed cost and the peak measures what the method itself allocates
    ep = batches[0][0]
    backbone(torch.cat([ep.support_images, ep.query_images])).sum().backward()
    backbone.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _proc_status_bytes("VmRSS")
    for i in range(cfg["warmup"]):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(cfg["iterations"]):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)  # robust to other load on a shared machine
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _proc_status_bytes("VmHWM") - base
    return {"episodes_per_s": cfg["meta_batch"] / seconds, "peak_mib": max(peak, 0) / 2**20}


def check_equivalences(cfg: dict[str, Any], device: torch.device) -> dict[str, float]:
    """FOMAML's meta-gradient vs the deep-copy loop's; vmap's loss vs the loop's (same episodes)."""
    episodes = make_episodes(cfg, device, batches=1)[0]
    out = {}
    backbone = make_backbone(cfg, device)
    deepcopy_meta_gradient(backbone, episodes, cfg["inner_steps"], 0.1)
    ref = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    FOMAML(backbone, inner_steps=cfg["inner_steps"], inner_lr=0.1, update_running_stats=False).meta_loss(episodes).backward()
    scale = max(float(r.abs().max()) for r in ref)
    out["fomaml_vs_deepcopy_grad"] = max(float((p.grad - r).abs().max()) for p, r in zip(backbone.parameters(), ref)) / scale
    for cls in (MAML, ANIL):
        backbone = make_backbone(cfg, device)
        losses = [
            float(cls(backbone, inner_steps=cfg["inner_steps"], inner_lr=0.1, vmap=v, update_running_stats=False).meta_loss(episodes))
            for v in (False, True)
        ]
        out[f"{cls.__name__.lower()}_vmap_vs_loop_loss"] = abs(losses[0] - losses[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny backbone, 28 px, 5 iterations")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each child")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = settings(args.quick)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, cfg, args.device)))
        return
    device = torch.device(args.device)
    checks = check_equivalences(cfg, device)
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append((method, None, result.stderr.strip().splitlines()[-1] if result.stderr else "failed"))
            continue
        rows.append((method, json.loads(result.stdout.strip().splitlines()[-1]), ""))
    base = rows[0][1]
    print(
        f"# MAML meta-training on {args.device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}): "
        f"{cfg['backbone']}, {cfg['image_size']} px, {cfg['way']}-way {cfg['shot']}-shot {cfg['query']} query, "
        f"meta-batch {cfg['meta_batch']}, {cfg['inner_steps']} inner steps, median of {cfg['iterations']} timed iterations"
    )
    memory = "peak CUDA memory above setup (MiB)" if device.type == "cuda" else "peak RSS above setup (MiB)"
    print(f"| method | episodes/s | vs deepcopy loop | {memory} | vs deepcopy loop |")
    print("|---|---|---|---|---|")
    for method, res, err in rows:
        if res is None:
            print(f"| {method} | failed: {err} | | | |")
            continue
        speed = res["episodes_per_s"] / base["episodes_per_s"] if base else float("nan")
        mem = res["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else float("nan")
        print(f"| {method} | {res['episodes_per_s']:.1f} | {speed:.2f}x | {res['peak_mib']:.1f} | {mem:.2f}x |")
    print(
        f"\nchecks on one meta-batch: FOMAML vs deepcopy-loop meta-gradient, max relative difference "
        f"{checks['fomaml_vs_deepcopy_grad']:.1e}; |loss(vmap) - loss(loop)|: MAML "
        f"{checks['maml_vmap_vs_loop_loss']:.1e}, ANIL {checks['anil_vmap_vs_loop_loss']:.1e}"
    )


if __name__ == "__main__":
    main()
