"""Protocol run of a frozen-backbone learner: feature cache vs embedding every episode anew.

The same frozen episodes are solved by ProtoNet: embedding support and query images of every
episode (the plain ``learner.adapt`` path), embedding each image once per task (the in-memory
``medmeta.evaluation.feature_cache``), and with the on-disk feature cache
(``ProtocolConfig.feature_cache_dir``): a first run that embeds and writes the files, then a
second run that reads them and embeds nothing. Prints time, images through the backbone, episodes
per second, the speed ratios (wall clock, and process CPU time, which a loaded shared machine
distorts less) and the largest metric difference against the plain path (0 on CPU;
on CUDA, TF32 convolutions make features depend slightly on batch composition, which can flip
near-tied queries: use ``--strict-fp32`` to compare exactly).

The default is the issue's setting: the L2L protocol (shots 3..10) on the embedded real-image set
(``medmeta.recipes.open_default("real")``, 13 tasks) read at 224 px, 3 channels, ImageNet
normalisation, with offline ImageNet MobileNetV2 weights. The full L2L setting (100 instances,
all tasks) embeds about half a million images on the plain path (hours on 2 CPU cores); ``--quick``
and ``--instances`` / ``--tasks`` make it fit a small machine: the plain path's time grows with
instances, the cached path's hardly (see benchmarks/README.md).

    python benchmarks/bench_protocol_cache.py --quick
    python benchmarks/bench_protocol_cache.py                                   # 8 instances, 13 tasks
    python benchmarks/bench_protocol_cache.py --instances 100 --device cuda     # the full L2L setting
    python benchmarks/bench_protocol_cache.py --data memory --backbone medmeta_conv4 --image-size 32
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from medmeta.backbones import create_backbone
from medmeta.data.array_source import ArrayTaskSource
from medmeta.evaluation.protocols import l2l_protocol, run_protocol
from medmeta.learners.protonet import ProtoNet
from medmeta.tasks import TaskDescription, TaskTarget


def memory_sources(image_size: int, per_class: int, seed: int = 0) -> dict:
    """Four in-memory tasks (multi-class, binary, multi-label, ordinal) of RGB images."""
    rng = np.random.default_rng(seed)

    def source(name: str, target: str, labels: np.ndarray, classes, keys=()):
        n = len(labels)
        images = torch.as_tensor(rng.standard_normal((n, 3, image_size, image_size)), dtype=torch.float32)
        d = TaskDescription(TaskTarget.parse(target), classes, f"bench: {name}", "bench", label_keys=keys, dataset_id="bench", task_name=name)
        return ("bench", name), ArrayTaskSource(images, labels, d, split="test")

    mc = np.repeat(np.arange(5), per_class)
    ordinal = np.repeat(np.array([1, 4, 6, 8]), per_class)
    binary = np.repeat(np.arange(2), per_class * 2)
    ml = (rng.random((per_class * 4, 3)) < 0.4).astype(np.int64)
    return dict(
        [
            source("multiclass", "MULTICLASS_CLASSIFICATION", mc, [f"c{i}" for i in range(5)]),
            source("binary", "BINARY_CLASSIFICATION", binary, ["neg", "pos"]),
            source("multilabel", "MULTILABEL_CLASSIFICATION", ml, ["a", "b", "c"]),
            source("ordinal", "ORDINAL_REGRESSION", ordinal, ["g1", "g4", "g6", "g8"], keys=(1, 4, 6, 8)),
        ]
    )


def real_sources(image_size: int, tasks: Optional[int]):
    """The embedded real-image set at ``image_size``, RGB, ImageNet statistics; the first
    ``tasks`` classification tasks (``None``: all)."""
    from medmeta.data import MetaDataset
    from medmeta.recipes import open_default

    root = open_default("real").root
    data = MetaDataset(root, channels=3, normalize="imagenet", image_size=image_size)
    keys = [(t.dataset_id, t.task_name) for t in data.tasks]
    return data, keys[:tasks] if tasks else keys


def synthetic_sources(root: Path, image_size: int):
    from medmeta.data import MetaDataset
    from medmeta.recipes import build_synthetic_meta_dataset

    path = build_synthetic_meta_dataset(root, seed=0, image_size=image_size)
    return MetaDataset(path)


class ForwardCounter:
    """Counts the images that go through a backbone (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.images += len(args[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (real data: 2 tasks, 4 instances)")
    p.add_argument("--data", choices=("real", "memory", "synthetic"), default="real")
    p.add_argument("--backbone", default=None, help="default: mobilenetv2_100 (real), medmeta_conv4 (else)")
    p.add_argument("--pretrained", default=None, help="default: imagenet-mobilenetv2 for mobilenetv2_100")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 (real), 32 / 64 (else)")
    p.add_argument("--instances", type=int, default=None)
    p.add_argument("--tasks", type=int, default=None, help="first N tasks of the real set (default: all; quick: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--strict-fp32", action="store_true",
                   help="disable TF32 convolutions/matmuls on CUDA (batch-independent numerics)")
    args = p.parse_args()
    if args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    real = args.data == "real"
    backbone_name = args.backbone or ("mobilenetv2_100" if real else "medmeta_conv4")
    pretrained = args.pretrained or ("imagenet-mobilenetv2" if backbone_name == "mobilenetv2_100" else None)
    image_size = args.image_size or (224 if real else 32 if args.quick else 64)
    instances = args.instances or ((4 if args.quick else 8) if real else (5 if args.quick else 20))
    shots = tuple(range(3, 11)) if real or not args.quick else (3, 5)
    with tempfile.TemporaryDirectory() as tmp:
        if real:
            data, tasks = real_sources(image_size, args.tasks or (2 if args.quick else None))
        elif args.data == "synthetic":
            data = synthetic_sources(Path(tmp) / "data", image_size)
            tasks = None
        else:
            data = memory_sources(image_size, per_class=25 if args.quick else 40)
            tasks = list(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = create_backbone(backbone_name, pretrained=pretrained)
        counter = ForwardCounter(backbone)
        learner = ProtoNet(backbone).to(args.device)
        results = {}
        cache_dir = str(Path(tmp) / "features")
        # the first (untimed) pass writes the frozen episode lists and warms up; the timed passes read them
        modes = (("warm-up", True, None), ("embed every episode", False, None), ("feature cache, in memory", True, None),
                 ("disk cache, first run (writes)", True, cache_dir), ("disk cache, second run (reads)", True, cache_dir))
        for mode, cache, disk in modes:
            config = l2l_protocol(shots=shots, instances=instances, feature_cache=cache, feature_cache_dir=disk,
                                  episode_dir=str(Path(tmp) / "episodes"), on_insufficient="skip")
            counter.images = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0, c0 = time.perf_counter(), time.process_time()
                df = run_protocol({"protonet": learner}, data, tasks, config, device=args.device, progress=False)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            results[mode] = (df, seconds, cpu, counter.images)
    pdf, ps, pc, pn = results["embed every episode"]
    metrics = [m for m in ("accuracy", "balanced_accuracy", "auroc", "mae") if m in pdf]
    n = len(pdf)
    weights = f" ({pretrained})" if pretrained else ""
    print(f"# protocol feature cache: ProtoNet/{backbone_name}{weights}, {args.data} data, {image_size}px, shots "
          f"{list(shots)}, {instances} instances, {pdf['task'].nunique()} tasks, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| path | episodes | images embedded | seconds | episodes/s | speed-up | CPU seconds | speed-up (CPU) "
          "| max abs metric difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    differing_total = 0
    for mode, (df, sec, cpu, images) in results.items():
        if mode == "warm-up":
            continue
        delta = np.abs(df[metrics].to_numpy(float) - pdf[metrics].to_numpy(float))
        differing_total += int((np.nan_to_num(delta) > 1e-9).any(axis=1).sum())
        print(f"| {mode} | {len(df)} | {images} | {sec:.2f} | {len(df) / sec:.1f} | {ps / sec:.2f}x | {cpu:.2f} | "
              f"{pc / cpu:.2f}x | {np.nanmax(delta) if delta.size else 0.0:.2e} |")
    print(f"episodes with any metric difference from the plain path: {differing_total} (over {n} episodes x "
          f"{len(results) - 2} paths; metrics {metrics}; TF32 {'off' if args.strict_fp32 else 'default'})")


if __name__ == "__main__":
    main()
