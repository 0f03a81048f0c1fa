"""Slide-level cell detection throughput: tiles and cells per second with tissue filtering
(medmeta's default: only tiles over the smear) against the same detector reading every tile.

A synthetic cytology slide (a round smear on glass, cells with known boxes and ROIs) is written,
a detector is trained briefly on patches of a second slide (so the cell counts mean something),
then :func:`medmeta.adapters.slides.detection.inference.detect_slide` runs twice on the test
slide. The table also gives the challenge score of each run: filtering must not lose cells.

    python benchmarks/bench_detection.py --quick
    python benchmarks/bench_detection.py --size 8192 --tile 512 --arch fasterrcnn --backbone resnet18
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2048^2 slide, 256 px tiles, tiny backbone, 120 iterations on 96 px patches")
    parser.add_argument("--size", type=int, default=4096, help="level-0 edge of the synthetic slide")
    parser.add_argument("--smear", type=float, default=0.35, help="smear radius as a fraction of the slide edge")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--arch", default="retinanet", choices=("retinanet", "fasterrcnn"))
    parser.add_argument("--backbone", default="medmeta_conv4")
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=300, help="training iterations (0: untrained detector)")
    parser.add_argument("--patch", type=int, default=256, help="training patch edge")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per detector call")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (the best is reported)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.tile, args.backbone, args.fpn_channels = 2048, 256, "medmeta_conv4_tiny", 32
        args.iterations, args.patch = 120, 96
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from medmeta.adapters.slides.detection.annotations import read_annotation
    from medmeta.adapters.slides.detection.detector import build_detector, train_detector
    from medmeta.adapters.slides.detection.inference import detect_slide
    from medmeta.adapters.slides.detection.metric import evaluate_slides
    from medmeta.adapters.slides.detection.patches import DetectionPatchDataset, PatchSampler
    from medmeta.adapters.slides.detection.synthetic_cytology import write_synthetic_cytology_slide
    from medmeta.adapters.slides.reader import open_slide

    tmp = tempfile.TemporaryDirectory(prefix="bench_detection_")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    common = dict(size=(args.size, args.size), smear_fraction=args.smear, n_rois=4, roi_size=(args.size // 6,) * 2,
                  abnormal_per_roi=(4, 8), compression="jpeg")
    train = write_synthetic_cytology_slide(root / "train", "train", seed=args.seed, **common)
    test = write_synthetic_cytology_slide(root / "test", "test", seed=args.seed + 1, **common)
    print(f"# wrote two {args.size}x{args.size} cytology slides in {time.perf_counter() - t0:.1f} s; "
          f"test slide: {len(test.truth.abnormal)} abnormal, {len(test.truth.normal)} normal cells")

    torch.manual_seed(args.seed)
    model = build_detector(arch=args.arch, backbone=args.backbone, fpn_channels=args.fpn_channels).to(device)
    if args.iterations > 0:
        t0 = time.perf_counter()
        patch = args.patch
        sampler = PatchSampler([str(train.slide_path)], [read_annotation(train.annotation_path)], patch_size=patch)
        windows = sampler.sample(n_cell=64, n_background=16, n_negative=0, seed=args.seed)
        dataset = DetectionPatchDataset([str(train.slide_path)], windows, patch, augment=True)
        train_detector(model, dataset, iterations=args.iterations, batch_size=4, lr=2e-3, log=None)
        print(f"# trained {args.arch} on {args.backbone} for {args.iterations} iterations in {time.perf_counter() - t0:.1f} s")
    model.eval()

    slide = open_slide(test.slide_path)
    annotation = read_annotation(test.annotation_path)
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        model(torch.rand(args.batch_size, 3, args.tile, args.tile, device=device).unbind(0))
    rows = []
    for name, min_tissue in (("every tile", 0.0), ("tissue tiles (medmeta)", 0.02)):
        best = None
        for _ in range(args.repeats):
            det = detect_slide(model, slide, tile_size=args.tile, overlap=args.overlap, min_tissue=min_tissue,
                               batch_size=args.batch_size)
            if best is None or det.seconds < best.seconds:
                best = det
        score = evaluate_slides({"test": annotation}, {"test": (best.boxes_xywh, best.scores)})
        rows.append((name, best, score.score))

    base = rows[0][1].seconds
    header = (f"{'tiles read':24s} {'tiles':>6s} {'cells':>6s} {'sec':>7s} {'tiles/s':>8s} {'cells/s':>8s} "
              f"{'speed-up':>8s} {'grid s':>8s} {'read s':>7s} {'model s':>8s} {'score':>6s}")
    print(f"# {args.arch} / {args.backbone} on {device.type}, tiles {args.tile} px overlap {args.overlap}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    print(header)
    print("-" * len(header))
    for name, det, sc in rows:
        n_cells = len(det.scores)
        print(f"{name:24s} {det.n_tiles:6d} {n_cells:6d} {det.seconds:7.2f} {det.n_tiles / det.seconds:8.1f} "
              f"{n_cells / det.seconds:8.1f} {base / det.seconds:8.2f} {det.timings['tiling']:8.2f} "
              f"{det.timings['reading']:7.2f} {det.timings['model']:8.2f} {sc:6.3f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
