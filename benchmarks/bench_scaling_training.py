"""Meta-training cost as the meta-batch grows: seconds per step and peak memory, to predict full runs.

One meta-training step is what medmeta's training loop does per step, without data loading
(``bench_sampler.py`` measures that): ``learner.meta_backward(meta_batch)`` (task by task, each
task's graph freed after its backward) and one outer Adam step. Each meta-batch size runs in a
fresh child process: the median seconds of a few steps after one warm-up step, and the peak
tensor memory of one more step above what was allocated before it
(:func:`medmeta.memory.track_peak_memory`: ``torch.cuda.max_memory_allocated`` on CUDA, the
profiler's allocation events on the CPU; the weights and the optimiser state are not counted).
The baseline for the ratios is meta-batch 1 in the same run: seconds per step should grow
linearly with the meta-batch (the ``s / task`` column stays flat) and peak memory should not grow
with it (one task's graph at a time), which is what lets the table predict longer runs.

    python benchmarks/bench_scaling_training.py --quick
    python benchmarks/bench_scaling_training.py --learner maml --backbone resnet18 --image-size 84
    python benchmarks/bench_scaling_training.py --device cuda --backbone resnet18 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_maml import LEARNERS, make_backbone, make_episodes  # noqa: E402

from medmeta.memory import track_peak_memory  # noqa: E402

NAMES = {"maml": "MAML", "fomaml": "FOMAML", "anil": "ANIL", "metasgd": "Meta-SGD"}


def child(spec: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Seconds per step and peak memory of one meta-batch size, in this fresh process."""
    backbone = make_backbone(spec["backbone"], device)
    learner = LEARNERS[NAMES[spec["learner"]]](backbone, inner_steps=spec["inner_steps"], inner_lr=0.1)
    cfg = dict(image_size=spec["image_size"], way=spec["way"], shot=spec["shot"], query=spec["query"],
               meta_batch=spec["meta_batch"])
    batches = make_episodes(cfg, device)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    cuda = device.type == "cuda"
    times = []
    for i in range(1 + spec["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad()
        learner.meta_backward(batches[i % len(batches)])
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    with track_peak_memory(device) as peak:
        learner.meta_backward(batches[0])
        opt.step()
    return {"seconds": statistics.median(times), "peak_mib": peak.mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="meta-batch 1, 2, 4, 8; 2 timed steps")
    p.add_argument("--learner", default="fomaml", choices=sorted(NAMES))
    p.add_argument("--backbone", default="conv4", help="conv4 (32 channels) or a timm name (resnet18)")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=10, help="query images per class (MedIMeta: 10)")
    p.add_argument("--inner-steps", type=int, default=4, help="MedIMeta's mm-MAML: 4")
    p.add_argument("--meta-batches", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=3, help="timed steps per size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child), torch.device(args.device))))
        return
    sizes = [1, 2, 4, 8] if args.quick else [int(x) for x in args.meta_batches.split(",")]
    steps = 2 if args.quick else args.steps
    rows = []
    for mb in sizes:
        spec = dict(learner=args.learner, backbone=args.backbone, image_size=args.image_size, way=args.way,
                    shot=args.shot, query=args.query, inner_steps=args.inner_steps, meta_batch=mb, steps=steps)
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--device", args.device]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append((mb, None, (result.stderr.strip().splitlines() or ["failed"])[-1]))
        else:
            rows.append((mb, json.loads(result.stdout.strip().splitlines()[-1]), ""))
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    mem = f"peak {'CUDA' if device.type == 'cuda' else 'CPU'} tensor MiB of a step"
    print(f"# meta-training scaling on {args.device} ({where}): {NAMES[args.learner]} on {args.backbone}, "
          f"{args.image_size} px, {args.way}-way {args.shot}-shot {args.query} query per class, {args.inner_steps} inner "
          f"steps; median of {steps} steps after 1 warm-up, a fresh process per meta-batch size")
    print(f"| meta-batch | s / step | s / task | vs meta-batch {sizes[0]} (s / task) | {mem} | vs meta-batch {sizes[0]} (memory) |")
    print("|---|---|---|---|---|---|")
    first = rows[0][1]
    for mb, res, err in rows:
        if res is None:
            print(f"| {mb} | failed: {err} | | | | |")
            continue
        per_task = res["seconds"] / mb
        t_ratio = per_task / (first["seconds"] / sizes[0]) if first else float("nan")
        m_ratio = res["peak_mib"] / first["peak_mib"] if first and first["peak_mib"] > 0 else float("nan")
        print(f"| {mb} | {res['seconds']:.2f} | {per_task:.3f} | {t_ratio:.2f}x | {res['peak_mib']:.1f} | {m_ratio:.2f}x |")


if __name__ == "__main__":
    main()
