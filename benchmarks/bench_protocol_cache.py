"""Protocol run of a frozen-backbone learner: feature cache vs embedding every episode anew.

ProtoNet solves the same frozen episodes (the L2L protocol: shots 3..10, ``--instances`` per shot
count, default 100) along these paths:

* **embed every episode** (the plain ``learner.adapt`` path) on a seeded subset of the episodes:
  the first ``--subset`` instances of every (task, shot count), same episode keys as the full run
  (embedding every episode at the full size takes hours on 2 CPU cores);
* **feature cache, in memory** on that subset (the measured ratio) and on the full run;
* the **on-disk feature cache** (``ProtocolConfig.feature_cache_dir``): a first full run that
  embeds and writes the files, a second full run that reads them and embeds nothing, and a second
  method (``--second-method``, default ``linear_probe``) on the same files, also embedding nothing.

Prints, per path, the images through the backbone, seconds and process CPU seconds (steadier on a
loaded shared machine), the cost per episode, the speed-up against the plain path (measured on
the subset; **projected** for full-size rows: the plain path's measured cost per episode times
the full episode count) and the largest metric difference from the plain path over the subset's
episodes (and from the in-memory full run over all episodes). The subset holds the same number of
instances of every (task, shot count), so its mean cost per episode is that of the full run.
On CUDA, TF32 convolutions make features depend slightly on batch composition, which can flip
near-tied queries: use ``--strict-fp32`` to compare exactly.

The default data is the embedded real-image set (``medmeta.recipes.open_default("real")``, 13
tasks) read at 224 px, 3 channels, ImageNet normalisation, with offline ImageNet MobileNetV2
weights.

    python benchmarks/bench_protocol_cache.py --quick                 # 2 tasks, 4 instances, subset 1
    python benchmarks/bench_protocol_cache.py --threads 1 --second-instances 20
    python benchmarks/bench_protocol_cache.py --device cuda --subset 100   # everything measured (GPU)
    python benchmarks/bench_protocol_cache.py --data memory --backbone medmeta_conv4 --image-size 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from medmeta.backbones import create_backbone
from medmeta.data.array_source import ArrayTaskSource
from medmeta.episodes.labels import SUPPORTED_TARGETS
from medmeta.episodes.provider import SourceProvider
from medmeta.episodes.samplers import task_names
from medmeta.evaluation.protocols import (
    ProtocolConfig,
    evaluate_episodes,
    l2l_protocol,
    protocol_episodes,
    run_protocol,
)
from medmeta.learners.base import Learner
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


METRICS = ("accuracy", "balanced_accuracy", "auroc", "mae")
KEY = ["dataset", "task", "shots", "instance"]


def max_difference(df: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, int, int]:
    """Largest absolute metric difference of ``df``'s episodes against the same episodes (same
    dataset, task, shots, instance) of ``reference`` (NaN on both sides counts as equal), the
    number of episodes with any difference above 1e-9, and the number compared."""
    metrics = [m for m in METRICS if m in df and m in reference]
    both = df[KEY + metrics].merge(reference[KEY + metrics], on=KEY, suffixes=("", "_ref"), validate="one_to_one")
    a = both[metrics].to_numpy(float)
    b = both[[f"{m}_ref" for m in metrics]].to_numpy(float)
    nan_same = np.isnan(a) & np.isnan(b)
    delta = np.where(nan_same, 0.0, np.abs(a - b))
    delta = np.where(np.isnan(delta), np.inf, delta)  # NaN on one side only: a difference
    if not len(both):
        return 0.0, 0, 0
    return float(delta.max()), int((delta > 1e-9).any(axis=1).sum()), len(both)


class Timer:
    """Wall clock, process CPU time and backbone images of one block."""

    def __init__(self, counter: ForwardCounter) -> None:
        self.counter = counter

    def __enter__(self) -> "Timer":
        self.counter.images = 0
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.images = self.counter.images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (real data: 2 tasks, 4 instances, subset 1)")
    p.add_argument("--data", choices=("real", "memory", "synthetic"), default="real")
    p.add_argument("--backbone", default=None, help="default: mobilenetv2_100 (real), medmeta_conv4 (else)")
    p.add_argument("--pretrained", default=None, help="default: imagenet-mobilenetv2 for mobilenetv2_100")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 (real), 32 / 64 (else)")
    p.add_argument("--instances", type=int, default=None, help="instances per shot count (default 100; quick 4)")
    p.add_argument("--subset", type=int, default=None,
                   help="instances per (task, shot count) on the plain path: the first k of the same episodes "
                        "(default 2; quick 1)")
    p.add_argument("--tasks", type=int, default=None, help="first N tasks of the real set (default: all; quick: 2)")
    p.add_argument("--second-method", default="linear_probe",
                   help="a frozen-backbone learner run second on the on-disk cache ('none': skip)")
    p.add_argument("--second-instances", type=int, default=None,
                   help="instances per shot count of the second method (default: all)")
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
    instances = args.instances or (4 if args.quick else 100)
    subset = min(args.subset or (1 if args.quick else 2), instances)
    shots = tuple(range(3, 11)) if real or not args.quick else (3, 5)
    with tempfile.TemporaryDirectory() as tmp:
        if real:
            data, tasks = real_sources(image_size, args.tasks or (2 if args.quick else None))
        elif args.data == "synthetic":
            data = synthetic_sources(Path(tmp) / "data", image_size)
            tasks = [(t.dataset_id, t.task_name) for t in data.tasks]
        else:
            data = memory_sources(image_size, per_class=25 if args.quick else 40)
            tasks = list(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = create_backbone(backbone_name, pretrained=pretrained)
        counter = ForwardCounter(backbone)
        learner = ProtoNet(backbone).to(args.device)
        cache_dir = str(Path(tmp) / "features")

        def config(disk: Optional[str] = None, n: int = instances) -> ProtocolConfig:
            return l2l_protocol(shots=shots, instances=n, feature_cache=True, feature_cache_dir=disk,
                                episode_dir=str(Path(tmp) / "episodes"), on_insufficient="skip")

        # the frozen episodes of the full run, written once (every timed path reads the same lists)
        provider = SourceProvider(data, split="test")
        plan = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for dataset_id, task_name in tasks:
                source = provider.get(dataset_id, task_name)
                if source.description.task_target not in SUPPORTED_TARGETS:
                    continue
                specs = protocol_episodes(source, config(), str(Path(tmp) / "episodes"))
                if specs:
                    plan.append((source, specs))
            # warm-up: one small embedding batch (kernel selection, allocator)
            learner.embed_no_grad(plan[0][0].read_images(np.arange(min(8, len(plan[0][0])))).to(args.device))
        tasks = [task_names(source) for source, _ in plan]
        full_episodes = sum(len(specs) for _, specs in plan)

        def on_subset(use_cache: bool) -> pd.DataFrame:
            rows = []
            for source, specs in plan:
                part = [s for s in specs if s.instance < subset]
                rows += evaluate_episodes(learner, source, part, config(), device=args.device,
                                          use_feature_cache=use_cache)
            return pd.DataFrame(rows)

        def protocol(learners: dict, disk: Optional[str]) -> pd.DataFrame:
            return run_protocol(learners, data, tasks, config(disk), device=args.device, progress=False)

        def first_instances(method: Learner, n: int, disk: str) -> pd.DataFrame:
            rows = []
            for source, specs in plan:
                rows += evaluate_episodes(method, source, [s for s in specs if s.instance < n], config(disk),
                                          device=args.device, use_feature_cache=True)
            return pd.DataFrame(rows)

        runs: dict[str, tuple[str, pd.DataFrame, Timer]] = {}
        steps = [
            ("embed every episode", "subset", lambda: on_subset(False)),
            ("feature cache, in memory", "subset", lambda: on_subset(True)),
            ("feature cache, in memory", "full", lambda: protocol({"protonet": learner}, None)),
            ("disk cache, first run (writes)", "full", lambda: protocol({"protonet": learner}, cache_dir)),
            ("disk cache, second run (reads)", "full", lambda: protocol({"protonet": learner}, cache_dir)),
        ]
        second = None
        if args.second_method != "none":
            from medmeta.learners.registry import create_learner

            second = create_learner(args.second_method, backbone).to(args.device)
            n2 = min(args.second_instances or instances, instances)
            if n2 == instances:
                steps.append((f"{args.second_method}, disk cache (second method)", "full",
                              lambda: protocol({args.second_method: second}, cache_dir)))
            else:  # the first n2 instances of the same frozen episodes
                steps.append((f"{args.second_method}, disk cache (second method)", f"first {n2} instances",
                              lambda: first_instances(second, n2, cache_dir)))
        for mode, scope, fn in steps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Timer(counter) as t:
                    df = fn()
            runs[f"{mode} [{scope}]"] = (scope, df, t)
            print(f"  done: {mode} [{scope}]: {len(df)} episodes, {t.images} images, {t.seconds:.1f} s, "
                  f"{t.cpu:.1f} CPU s", file=sys.stderr, flush=True)

        plain = runs["embed every episode [subset]"][1]
        memory_full = runs["feature cache, in memory [full]"][1]
        second_check = None
        if second is not None:  # the second method on images, on its first subset episode of each task
            rows = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for source, specs in plan:
                    rows += evaluate_episodes(second, source, [s for s in specs if s.instance == 0][:1], config(),
                                              device=args.device, use_feature_cache=False)
            second_check = pd.DataFrame(rows)

    _, _, pt = runs["embed every episode [subset]"]
    n_plain = len(plain)
    plain_wall, plain_cpu = pt.seconds / n_plain, pt.cpu / n_plain
    projected_wall, projected_cpu = plain_wall * full_episodes, plain_cpu * full_episodes
    weights = f" ({pretrained})" if pretrained else ""
    print(f"# protocol feature cache: ProtoNet/{backbone_name}{weights}, {args.data} data, {image_size}px, shots "
          f"{list(shots)}, {instances} instances, {len(tasks)} tasks ({full_episodes} episodes); plain path on the "
          f"first {subset} instance(s) of every (task, shot count) ({n_plain} episodes, same episode keys); "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print("| path | scope | episodes | images embedded | seconds | CPU seconds | ms/episode | CPU ms/episode "
          "| speed-up | speed-up (CPU) | max abs metric difference (episodes compared) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for name, (scope, df, t) in runs.items():
        mode = name.rsplit(" [", 1)[0]
        n = len(df)
        if scope == "subset":
            ref_wall, ref_cpu, label = pt.seconds, pt.cpu, ""
        else:
            ref_wall, ref_cpu, label = plain_wall * n, plain_cpu * n, " (projected)"
        ratios[name] = (ref_wall / t.seconds, ref_cpu / t.cpu)
        if mode.startswith(args.second_method) and second_check is not None:
            diff, bad, cmp = max_difference(df, second_check)
            against = f"vs its plain path: {diff:.2e} ({cmp})"
        else:
            diff, bad, cmp = max_difference(df, plain)
            against = f"{diff:.2e} ({cmp})"
            if scope != "subset":
                d2, b2, c2 = max_difference(df, memory_full)
                against += f"; vs in-memory full run: {d2:.2e} ({c2})" if df is not memory_full else ""
                bad += b2
        print(f"| {mode} | {scope} | {n} | {t.images} | {t.seconds:.2f} | {t.cpu:.2f} | {1e3 * t.seconds / n:.1f} | "
              f"{1e3 * t.cpu / n:.1f} | {ref_wall / t.seconds:.1f}x{label} | {ref_cpu / t.cpu:.1f}x{label} | "
              f"{against}{'' if not bad else f', {bad} episodes differ'} |")
    print(f"| embed every episode | full (projected) | {full_episodes} | ~{pt.images / n_plain * full_episodes:.0f} | "
          f"{projected_wall:.0f} | {projected_cpu:.0f} | {1e3 * plain_wall:.1f} | {1e3 * plain_cpu:.1f} | 1.0x | 1.0x "
          f"| (not run) |")
    measured = ratios["feature cache, in memory [subset]"]
    full = ratios["feature cache, in memory [full]"]
    print(f"measured at the subset size ({n_plain} episodes): feature cache in memory {measured[0]:.1f}x wall, "
          f"{measured[1]:.1f}x CPU -> 20x {'reached' if measured[1] >= 20 else 'not reached'} as measured (CPU)")
    print(f"projected at the full size ({full_episodes} episodes): plain path {1e3 * plain_cpu:.0f} CPU ms/episode "
          f"x {full_episodes} = {projected_cpu / 3600:.2f} CPU hours ({projected_wall / 3600:.2f} h wall), not run; "
          f"feature cache in memory (measured) {runs['feature cache, in memory [full]'][2].cpu:.1f} CPU s -> "
          f"{full[1]:.0f}x CPU (projected) -> 20x {'reached' if full[1] >= 20 else 'not reached'} as projected")
    for name, (_, df, t) in runs.items():
        if "second run" in name or name.startswith(args.second_method):
            print(f"{name.rsplit(' [', 1)[0]}: {t.images} images embedded (0 expected), {t.seconds:.2f} s, "
                  f"{t.cpu:.2f} CPU s for {len(df)} episodes")


if __name__ == "__main__":
    main()
