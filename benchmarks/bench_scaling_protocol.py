"""Cost of one protocol run as tasks x shots x instances grow: seconds and peak memory.

Each size runs in its own process (so its peak resident memory is its own): ProtoNet with the
in-memory feature cache (the default path of frozen-backbone methods) on the embedded real-image
set read at ``--image-size`` (RGB, ImageNet statistics) with ``--backbone`` (default: offline
ImageNet MobileNetV2 at 224 px), L2L-style episodes (all classes, 10 query images per class).
The baseline row is the same process before the run (imports, data opened, model built).

A run costs about ``a x images embedded + b x episodes``: the script fits ``a`` and ``b`` over
the sizes (least squares) and prints them, so the cost of other sizes can be predicted (see
benchmarks/README.md for full MedIMeta).

    python benchmarks/bench_scaling_protocol.py --quick
    python benchmarks/bench_scaling_protocol.py
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SIZES = {  # name: (tasks, shot counts from 3, instances)
    "S": (2, 2, 5),
    "M": (4, 4, 10),
    "L": (8, 8, 20),
    "XL": (13, 8, 40),
}


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(size: str, backbone_name: str, pretrained: str | None, image_size: int, episode_dir: str,
        threads: int | None = None) -> dict:
    """Run one size in this process; returns its measurements."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from medmeta.backbones import create_backbone
    from medmeta.data import MetaDataset
    from medmeta.evaluation.protocols import l2l_protocol, run_protocol
    from medmeta.learners.protonet import ProtoNet
    from medmeta.recipes import open_default

    n_tasks, n_shots, instances = SIZES[size]
    data = MetaDataset(open_default("real").root, channels=3, normalize="imagenet", image_size=image_size)
    tasks = [(t.dataset_id, t.task_name) for t in data.tasks][:n_tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone(backbone_name, pretrained=pretrained)
    embedded = [0]
    backbone.register_forward_pre_hook(lambda module, args: embedded.__setitem__(0, embedded[0] + len(args[0])))
    learner = ProtoNet(backbone)
    config = l2l_protocol(shots=tuple(range(3, 3 + n_shots)), instances=instances, on_insufficient="skip",
                          episode_dir=episode_dir)
    baseline = peak_rss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        df = run_protocol({"protonet": learner}, data, tasks, config, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"size": size, "tasks": int(df["task"].nunique()), "shots": n_shots, "instances": instances,
            "episodes": len(df), "embedded": embedded[0], "seconds": seconds, "cpu": cpu, "baseline_mib": baseline,
            "peak_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sizes S, M, L only (default: S, M, L, XL)")
    p.add_argument("--sizes", default=None, help=f"comma-separated names of {list(SIZES)}")
    p.add_argument("--backbone", default="mobilenetv2_100")
    p.add_argument("--pretrained", default="imagenet-mobilenetv2", help="'none' for random weights")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--episode-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    pretrained = None if args.pretrained in ("none", "") else args.pretrained
    if args.one is not None:
        print(json.dumps(one(args.one, args.backbone, pretrained, args.image_size, args.episode_dir, args.threads)))
        return
    sizes = args.sizes.split(",") if args.sizes else (["S", "M", "L"] if args.quick else list(SIZES))
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; expected names of {list(SIZES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            cmd = [sys.executable, __file__, "--one", size, "--backbone", args.backbone, "--pretrained",
                   args.pretrained, "--image-size", str(args.image_size), "--episode-dir", str(Path(tmp) / size)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"# one protocol run per size: ProtoNet/{args.backbone} ({pretrained or 'random weights'}), in-memory feature "
          f"cache, embedded real set at {args.image_size}px, 10 query/class, cpu, {rows[0]['threads']} threads")
    print("| size | tasks | shot counts | instances | episodes | images embedded | seconds | CPU seconds | episodes/s "
          "| peak RSS (MiB) | baseline RSS before the run (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['tasks']} | {r['shots']} | {r['instances']} | {r['episodes']} | {r['embedded']} "
              f"| {r['seconds']:.1f} | {r['cpu']:.1f} | {r['episodes'] / r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['baseline_mib']:.0f} |")
    if len(rows) >= 2:
        design = np.array([[r["embedded"], r["episodes"]] for r in rows], dtype=float)
        seconds = np.array([r["cpu"] for r in rows])
        (a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        print(f"fit: CPU seconds ~ {a * 1e3:.2f} ms x images embedded + {b * 1e3:.2f} ms x episodes "
              f"(max relative error {np.max(np.abs(design @ [a, b] - seconds) / seconds):.0%})")


if __name__ == "__main__":
    main()
