"""Time and peak memory per case of slice-wise volume inference against a plain full-resolution
pass (every slice of the volume in one forward), in the same run, on synthetic CT.

The model is a few-shot segmentation head (default: the prototype head on ``medmeta_conv4``)
adapted to annotated slices of one support volume. Every mode predicts the same volumes; the
``agree`` column is the fraction of voxels whose label equals the full pass's (slice-wise
inference is exact, so 1.000; in-slice sliding windows change the context at window borders).
Memory per case: on CPU the peak resident memory above the case's starting point (``VmHWM``
reset per case), on CUDA PyTorch's peak allocated memory.

    python benchmarks/bench_segmentation.py --quick
    python benchmarks/bench_segmentation.py --device cuda --shape 512 512 96 --amp
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

from medmeta.adapters.segmentation.efficiency import markdown_table, measure_case
from medmeta.adapters.segmentation.flare import adapt_on_volumes, pair_cases
from medmeta.adapters.segmentation.slices import prepare_slices
from medmeta.adapters.segmentation.synthetic_ct import FLARE_LABELS, write_synthetic_ct_cases
from medmeta.adapters.segmentation.volumes import case_name, predict_volume, read_volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small cases (96 x 96 x 24)")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 64))
    p.add_argument("--method", default="prototype")
    p.add_argument("--backbone", default="medmeta_conv4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 8))
    p.add_argument("--window", type=int, default=None, help="also run in-slice sliding windows of this size")
    args = p.parse_args()
    if args.quick:
        args.cases, args.shape = 2, (96, 96, 24)
    torch.manual_seed(0)
    device = torch.device(args.device)

    from medmeta.adapters.segmentation.heads import create_segmenter
    from medmeta.backbones import create_backbone

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_ct_cases(tmp, num_cases=args.cases + 1, shape=args.shape, seed=0)
        pairs = pair_cases(Path(tmp) / "images", Path(tmp) / "labels")
        learner = create_segmenter(args.method, create_backbone(args.backbone)).to(device).eval()
        predictor, n_support = adapt_on_volumes(learner, pairs[:1], FLARE_LABELS, slices_per_volume=4, device=device)
        volumes = [(case_name(case), prepare_slices(read_volume(case).data, 2)) for case, _ in pairs[1:]]

        modes: list[tuple[str, dict]] = [("full", {"batch_size": None})]
        modes += [(f"slice-wise b={b}", {"batch_size": b}) for b in args.batch_sizes]
        if args.window:
            modes.append((f"sliding {args.window} b={max(args.batch_sizes)}",
                          {"batch_size": max(args.batch_sizes), "window": args.window, "overlap": 0.25}))
        # warm-up (lazy CUDA / oneDNN initialisation is not a case)
        predict_volume(predictor, volumes[0][1][:2], batch_size=2, device=device, amp=args.amp)
        rows, reference = [], {}
        for mode, kwargs in modes:
            for name, slices in volumes:
                with measure_case(name, device) as rec:
                    pred = predict_volume(predictor, slices, device=device, amp=args.amp, **kwargs)
                if mode == "full":
                    reference[name] = pred
                memory = (rec.cuda_peak_allocated_mb if device.type == "cuda" else rec.peak_rss_mb - rec.memory_start_mb)
                rows.append({"mode": mode, "case": name, "slices": len(slices), "seconds": rec.seconds,
                             "peak_mb": memory, "agree": float((pred == reference[name]).mean())})
        df = pd.DataFrame(rows)
    summary = df.groupby("mode", sort=False).agg(seconds_per_case=("seconds", "mean"), peak_mb=("peak_mb", "max"),
                                                 agree=("agree", "min")).reset_index()
    full = summary.iloc[0]
    summary["time_vs_full"] = summary["seconds_per_case"] / full["seconds_per_case"]
    summary["memory_vs_full"] = summary["peak_mb"] / full["peak_mb"]
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(f"# Slice-wise vs full-resolution inference: {args.method} on {args.backbone}, {where}, "
          f"{len(volumes)} cases of {tuple(args.shape)} voxels, {n_support} support slices, amp={args.amp}\n")
    print("Per case (memory: " + ("peak allocated CUDA memory" if device.type == "cuda" else
                                 "peak resident memory above the case's start") + ", MiB):\n")
    print(markdown_table(df))
    print("\nPer mode (mean seconds per case, max peak memory, ratios to the full pass):\n")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
