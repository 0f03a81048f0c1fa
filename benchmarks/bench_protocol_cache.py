"""Protocol run of a frozen-backbone learner: feature cache vs embedding every episode anew.

The same frozen episodes are solved twice by ProtoNet: once embedding each image once per task
(``medmeta.evaluation.feature_cache``), once embedding support and query images of every
episode (the plain ``learner.adapt`` path). Prints time, images embedded, episodes per second,
the speed ratio and the largest metric difference (0 on CPU; on CUDA, TF32 convolutions make
features depend slightly on batch composition, which can flip near-tied queries: use
``--strict-fp32`` to compare exactly).

    python benchmarks/bench_protocol_cache.py --quick
    python benchmarks/bench_protocol_cache.py --data synthetic --backbone resnet18 --image-size 64
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medmeta.backbones import create_backbone
from medmeta.data.array_source import ArrayTaskSource
from medmeta.evaluation.protocols import l2l_protocol, run_protocol
from medmeta.learners.protonet import ProtoNet
from medmeta.tasks import TaskDescription


def memory_sources(image_size: int, per_class: int, seed: int = 0) -> dict:
    """Four in-memory tasks (multi-class, binary, multi-label, ordinal) of RGB images."""
    rng = np.random.default_rng(seed)

    def source(name: str, target: str, labels: np.ndarray, classes, keys=()):
        n = len(labels)
        images = torch.as_tensor(rng.standard_normal((n, 3, image_size, image_size)), dtype=torch.float32)
        d = TaskDescription(target, classes, f"bench: {name}", "bench", label_keys=keys, dataset_id="bench", task_name=name)
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


def synthetic_sources(root: Path, image_size: int):
    from medmeta.data import MetaDataset
    from medmeta.recipes import build_synthetic_meta_dataset

    path = build_synthetic_meta_dataset(root, seed=0, image_size=image_size)
    return MetaDataset(path)


class CountingProtoNet(ProtoNet):
    """ProtoNet that counts the images it embeds."""

    images_embedded = 0

    def embed(self, images):
        self.images_embedded += len(images)
        return super().embed(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast run")
    p.add_argument("--data", choices=("memory", "synthetic"), default="memory")
    p.add_argument("--backbone", default="medmeta_conv4")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--instances", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--strict-fp32", action="store_true",
                   help="disable TF32 convolutions/matmuls on CUDA (batch-independent numerics)")
    args = p.parse_args()
    if args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(max(1, torch.get_num_threads()))
    image_size = args.image_size or (32 if args.quick else 64)
    instances = args.instances or (5 if args.quick else 20)
    shots = (3, 5) if args.quick else tuple(range(3, 11))
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "synthetic":
            data = synthetic_sources(Path(tmp) / "data", image_size)
            tasks = None
        else:
            data = memory_sources(image_size, per_class=25 if args.quick else 40)
            tasks = list(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = create_backbone(args.backbone)
        learner = CountingProtoNet(backbone).to(args.device)
        results = {}
        # the first (untimed) pass writes the frozen episode lists and warms up; both timed passes read them
        for mode, cache in (("warm-up", True), ("embed every episode", False), ("feature cache", True)):
            config = l2l_protocol(shots=shots, instances=instances, feature_cache=cache, episode_dir=str(Path(tmp) / "episodes"),
                                  on_insufficient="skip")
            learner.images_embedded = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                df = run_protocol({"protonet": learner}, data, tasks, config, device=args.device, progress=False)
                seconds = time.perf_counter() - t0
            results[mode] = (df, seconds, learner.images_embedded)
    (cdf, cs, cn), (pdf, ps, pn) = results["feature cache"], results["embed every episode"]
    metrics = [m for m in ("accuracy", "balanced_accuracy", "auroc", "mae") if m in cdf]
    delta = np.abs(cdf[metrics].to_numpy(float) - pdf[metrics].to_numpy(float))
    diff = np.nanmax(delta)
    differing = int((np.nan_to_num(delta) > 1e-9).any(axis=1).sum())
    n = len(cdf)
    print(f"# protocol feature cache: ProtoNet/{args.backbone}, {args.data} data, {image_size}px, shots {list(shots)}, "
          f"{instances} instances, {cdf['task'].nunique()} tasks, device {args.device}, {torch.get_num_threads()} threads")
    print("| path | episodes | images embedded | seconds | episodes/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| embed every episode | {n} | {pn} | {ps:.2f} | {n / ps:.1f} | 1.00x |")
    print(f"| feature cache | {n} | {cn} | {cs:.2f} | {n / cs:.1f} | {ps / cs:.2f}x |")
    print(f"max |metric difference| between the paths: {diff:.2e}; episodes with any difference: {differing}/{n} "
          f"(metrics {metrics}; TF32 {'off' if args.strict_fp32 else 'default'})")


if __name__ == "__main__":
    main()
