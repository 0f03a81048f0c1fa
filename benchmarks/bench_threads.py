"""Two medmeta jobs on one machine: torch's default CPU threads vs medmeta's per-process share,
against one job alone.

    python benchmarks/bench_threads.py --quick
    python benchmarks/bench_threads.py --episodes 40 --repeats 5 --jobs 2 --image-size 84

Each job is a separate process doing a fixed amount of ProtoNet meta-training (Conv-4, 5-way
5-shot, 10 queries per class, forward + backward + SGD step per episode, random images). The
jobs import and warm up first, then start together; each times only its episodes. Settings:

* ``torch default``: nothing set, torch runs one intra-op thread per core it sees;
* ``medmeta``: the job calls :func:`medmeta.threads.apply_num_threads` as the apps do. Alone it
  picks every CPU; for N jobs side by side it gets ``MEDMETA_NUM_THREADS`` = its share
  (``default_num_threads(cpus, local_world_size=N)``, what torchrun ranks get automatically).

Configurations alternate within each repeat (the machine is shared and noisy); the table shows
the median seconds per job and the slowdown against one job alone with torch's default. The last
row (one job with the share of N jobs) shows how much of the gain comes from other processes
already busy on the machine: the load average is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from medmeta.threads import THREADS_ENV, available_cpus, default_num_threads


def worker(mode: str, episodes: int, image_size: int, seed: int) -> None:
    """One job: warm up, say ``ready``, wait for ``go`` on stdin, run, print the result as JSON."""
    import torch

    from medmeta.backbones import create_backbone
    from medmeta.learners import ProtoNet
    from medmeta.tasks import Episode, TaskDescription, TaskTarget
    from medmeta.threads import apply_num_threads

    if mode == "medmeta":
        apply_num_threads()
    torch.manual_seed(seed)
    learner = ProtoNet(create_backbone("medmeta_conv4"))
    optimizer = torch.optim.SGD(learner.parameters(), lr=1e-3)
    way, shot, query = 5, 5, 10
    description = TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, tuple(f"c{i}" for i in range(way)),
                                  "bench: threads", "bench")
    episode = Episode(
        torch.randn(way * shot, 3, image_size, image_size), torch.arange(way).repeat_interleave(shot),
        torch.randn(way * query, 3, image_size, image_size), torch.arange(way).repeat_interleave(query),
        description,
    )

    def step() -> None:
        optimizer.zero_grad()
        learner.meta_loss([episode]).backward()
        optimizer.step()

    step()  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for _ in range(episodes):
        step()
    print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}), flush=True)


def run_jobs(jobs: int, mode: str, episodes: int, image_size: int, threads: Optional[int]) -> list[dict]:
    """Start ``jobs`` worker processes, release them together, return their results."""
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env[THREADS_ENV] = str(threads)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, "--episodes", str(episodes), "--image-size", str(image_size),
             "--seed", str(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        for i in range(jobs)
    ]
    for proc in procs:  # all imported and warmed up
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker did not start: {line!r}")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed with status {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 episodes, 2 repeats")
    p.add_argument("--episodes", type=int, default=20, help="episodes per job")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="jobs side by side")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--worker", choices=["default", "medmeta"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.episodes, args.image_size, args.seed)
        return
    if args.quick:
        args.episodes, args.repeats = 10, 2
    cpus = available_cpus()
    share = default_num_threads(cpus, local_world_size=args.jobs)
    configs = [  # (label, jobs, mode, MEDMETA_NUM_THREADS)
        ("1 job, torch default", 1, "default", None),
        (f"{args.jobs} jobs, torch default", args.jobs, "default", None),
        (f"{args.jobs} jobs, medmeta ({THREADS_ENV}={share})", args.jobs, "medmeta", share),
        ("1 job, medmeta (default)", 1, "medmeta", None),
        (f"1 job, {THREADS_ENV}={share}", 1, "medmeta", share),  # reads the rows above on a busy machine
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    seconds: dict[str, list[float]] = {c[0]: [] for c in configs}
    threads: dict[str, int] = {}
    for _ in range(args.repeats):
        for label, jobs, mode, share_env in configs:
            results = run_jobs(jobs, mode, args.episodes, args.image_size, share_env)
            seconds[label] += [r["seconds"] for r in results]
            threads[label] = results[0]["threads"]
    base = statistics.median(seconds[configs[0][0]])
    print(f"# ProtoNet meta-training, Conv-4, 5-way 5-shot 10-query at {args.image_size} px, {args.episodes} episodes "
          f"per job, {args.repeats} repeats (alternating); {cpus} CPU(s) available; load average {load:.1f} before, "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} after")
    print("| setting | threads per job | s per job (median) | episodes/s, all jobs | slowdown vs 1 job alone |")
    print("|---|---|---|---|---|")
    for label, jobs, _, _ in configs:
        med = statistics.median(seconds[label])
        print(f"| {label} | {threads[label]} | {med:.2f} | {jobs * args.episodes / med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
