"""Command line for Tianchi-style cell detection: train, predict a submission folder, score it.

    python -m medmeta.adapters.slides.detection predict --checkpoint det.pt --slides slides/ --out submission/
    python -m medmeta.adapters.slides.detection score --submission submission/ --annotations annotations/
    python -m medmeta.adapters.slides.detection train --slides slides/ --annotations annotations/ --out det.pt
    python -m medmeta.adapters.slides.detection synthesize --out synthetic/ --positive 4 --negative 2

Slides are TIFF/SVS conversions of the challenge's ``.kfb`` files (``.kfb`` itself is read when
the optional ``kfbslide`` package is installed). A slide is positive for training when its
annotation file (same id, ``.json``) lists ``pos`` boxes, negative otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from medmeta.errors import InsufficientDataError, MissingDataError, exit_on_user_error
from medmeta.threads import apply_num_threads

__all__ = ["main", "find_slides"]


def find_slides(folder: "str | Path", suffixes: Optional[Sequence[str]] = None) -> list[Path]:
    """Slide files of a folder (sorted), by extension."""
    from medmeta.adapters.slides.detection.inference import SLIDE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDataError(f"slide folder {folder} does not exist")
    sfx = tuple(s.lower() for s in (suffixes or SLIDE_SUFFIXES))
    slides = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in sfx)
    if not slides:
        raise MissingDataError(f"slide folder {folder}: no slide files with extensions {sfx}")
    return slides


def _add_tiling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile-size", type=int, default=512, help="tile edge in pixels at the read level")
    p.add_argument("--level", type=int, default=None, help="pyramid level to read (default 0)")
    p.add_argument("--mpp", type=float, default=None, help="read scale in microns per pixel instead of --level")
    p.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbouring tiles (> largest cell)")
    p.add_argument("--min-tissue", type=float, default=0.02, help="minimum tissue fraction of a tile")
    p.add_argument("--no-tissue", action="store_true", help="read every tile (no tissue filtering)")


def _predict(args: argparse.Namespace) -> int:
    import torch

    from medmeta.adapters.slides.detection.detector import load_detector
    from medmeta.adapters.slides.detection.inference import run_inference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_detector(args.checkpoint, map_location=device)
    slides = find_slides(args.slides)
    t0 = time.perf_counter()
    results = run_inference(
        model, slides, args.out, tile_size=args.tile_size, level=args.level, mpp=args.mpp, overlap=args.overlap,
        min_tissue=0.0 if args.no_tissue else args.min_tissue, batch_size=args.batch_size,
        score_threshold=args.score_threshold, nms_iou=args.nms_iou, max_detections=args.max_detections,
        on_error="skip" if args.skip_errors else "raise", log_fn=None if args.quiet else print,
    )
    total = time.perf_counter() - t0
    tiles = sum(r.n_tiles for r in results)
    cells = sum(len(r.scores) for r in results)
    print(f"[detect] {len(results)}/{len(slides)} slides, {tiles} tiles, {cells} cells in {total:.1f} s "
          f"({tiles / max(total, 1e-9):.1f} tiles/s) -> {args.out}")
    if args.report:
        from medmeta.adapters.slides.detection.annotations import atomic_write_text

        atomic_write_text(args.report, json.dumps({"seconds": total, "slides": [r.summary() for r in results]}, indent=1))
    return 0 if len(results) == len(slides) else 1


def _score(args: argparse.Namespace) -> int:
    from medmeta.adapters.slides.detection.metric import score_submission

    res = score_submission(args.submission, args.annotations, roi_rule=args.roi_rule, interpolation=args.interpolation)
    d = res.to_dict()
    if not args.quiet:
        for s in d["per_slide"]:
            print(f"{s['slide_id']:>30s}  rois {s['n_rois']:3d}  gt {s['n_gt']:4d}  pred {s['n_pred_in_rois']:5d}  "
                  f"AP50 {s['ap50']:.4f}  AP70 {s['ap70']:.4f}  score {s['score']:.4f}")
    print(f"AP50 {d['ap50']:.4f}  AP70 {d['ap70']:.4f}  score {d['score']:.4f}  (mean of slides {d['mean_of_slides']:.4f})")
    if args.json:
        from medmeta.adapters.slides.detection.annotations import atomic_write_text

        atomic_write_text(args.json, json.dumps(d, indent=1))
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from medmeta.adapters.slides.detection.annotations import read_annotation
    from medmeta.adapters.slides.detection.detector import build_detector, save_detector, train_detector
    from medmeta.adapters.slides.detection.inference import slide_id_of
    from medmeta.adapters.slides.detection.patches import DetectionPatchDataset, PatchSampler
    from medmeta.adapters.slides.reader import open_slide

    slides = find_slides(args.slides)
    ann_dir = Path(args.annotations)
    anns = []
    for s in slides:
        p = ann_dir / f"{slide_id_of(s)}.json"
        anns.append(read_annotation(p, slide_size=open_slide(s).dimensions) if p.is_file() else None)
    if not any(a is not None and len(a.cells) for a in anns):
        raise InsufficientDataError(f"no slide in {args.slides} has an annotation with pos boxes in {ann_dir}")
    sampler = PatchSampler([str(s) for s in slides], anns, patch_size=args.patch_size, level=args.level,
                           min_visible=args.min_visible)
    windows = sampler.sample(args.cell_patches, args.background_patches, args.negative_patches, seed=args.seed)
    dataset = DetectionPatchDataset([str(s) for s in slides], windows, args.patch_size, level=args.level,
                                    augment=True, seed=args.seed)
    print(f"[train] {len(windows)} patches ({sum(w.kind == 'cell' for w in windows)} around cells) from {len(slides)} slides")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_detector(arch=args.arch, backbone=args.backbone, fpn_channels=args.fpn_channels,
                           pretrained=args.pretrained).to(device)
    history = train_detector(model, dataset, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                             num_workers=args.workers, seed=args.seed, run_dir=args.run_dir,
                             checkpoint_every=args.checkpoint_every)
    save_detector(args.out, model, extra={"final_loss": history[-1]["loss"], "iterations": args.iterations,
                                          "patch_size": args.patch_size, "level": args.level})
    print(f"[train] saved {args.out}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from medmeta.adapters.slides.detection.synthetic_cytology import make_synthetic_cytology_set

    files = make_synthetic_cytology_set(args.out, args.positive, args.negative, size=(args.size, args.size), seed=args.seed)
    print(f"[synthesize] {len(files)} slides in {Path(args.out) / 'slides'}, annotations in {Path(args.out) / 'annotations'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmeta-detect", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="run a detector checkpoint over a folder of slides -> submission folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--slides", required=True, help="folder of slides (.tif/.tiff/.svs/... or .kfb)")
    p.add_argument("--out", required=True, help="submission folder (one <slide id>.json per slide)")
    _add_tiling_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--nms-iou", type=float, default=0.3)
    p.add_argument("--max-detections", type=int, default=None, help="keep the best N boxes per slide")
    p.add_argument("--device", default=None)
    p.add_argument("--report", default=None, help="write per-slide timings to this JSON file")
    p.add_argument("--skip-errors", action="store_true", help="skip unreadable slides instead of stopping")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_predict)

    p = sub.add_parser("score", help="score a submission folder (AP at IoU 0.5 and 0.7 inside ROIs)")
    p.add_argument("--submission", required=True)
    p.add_argument("--annotations", required=True, help="folder of annotation JSONs, one per scored slide")
    p.add_argument("--roi-rule", choices=("center", "inside"), default="center")
    p.add_argument("--interpolation", choices=("all", "coco101"), default="all")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_score)

    p = sub.add_parser("train", help="train a detector on patches around annotated cells")
    p.add_argument("--slides", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--out", required=True, help="checkpoint path")
    p.add_argument("--arch", choices=("fasterrcnn", "retinanet"), default="fasterrcnn")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--pretrained", default=None, help="local backbone weights file (never downloaded)")
    p.add_argument("--fpn-channels", type=int, default=128)
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--min-visible", type=float, default=0.6)
    p.add_argument("--cell-patches", type=int, default=64, help="patches around cells per positive slide")
    p.add_argument("--background-patches", type=int, default=16, help="cell-free ROI patches per positive slide")
    p.add_argument("--negative-patches", type=int, default=32, help="patches per negative slide")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--run-dir", default=None,
                   help="run folder for checkpoints/ and metrics.csv; run again with it to resume an interrupted run")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints of --run-dir (default 100)")
    p.set_defaults(func=_train)

    p = sub.add_parser("synthesize", help="write a synthetic cytology set (slides/ and annotations/)")
    p.add_argument("--out", required=True)
    p.add_argument("--positive", type=int, default=4)
    p.add_argument("--negative", type=int, default=2)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthesize)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``predict``, ``score``, ``train`` or ``synthesize`` (see the module doc)."""
    args = build_parser().parse_args(argv)
    # bad input (a UserError: SlideError, AnnotationError, ...): one clear line naming the file
    # and entry, exit status 2, not a traceback
    exit_on_user_error("medmeta-detect", apply_num_threads, workers=int(getattr(args, "workers", 0) or 0))
    return int(exit_on_user_error(f"medmeta-detect {args.command}", args.func, args))


if __name__ == "__main__":
    sys.exit(main())
