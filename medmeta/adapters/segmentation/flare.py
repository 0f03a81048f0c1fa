"""A FLARE-style runner: a folder of CT volumes in, one predicted mask per case out, timed.

Few-shot adaptation replaces FLARE's training: the learner adapts once to the annotated slices
of a few support volumes, then predicts every input volume slice by slice. Per case the runner
reads the volume, windows and slices it, predicts (``batch_size`` slices at a time), writes
``<case>.nii.gz`` with the input's affine and header (so the spacing and orientation match) and
records wall time and memory (:mod:`.efficiency`). With ground truth (``labels_dir``) it adds
Dice and NSD per organ, scored with the ground truth's spacing as FLARE's evaluation does.

Input names follow FLARE / nnU-Net: ``<case>_0000.nii.gz`` gives ``<case>.nii.gz``.

Command line (installed as ``medmeta-flare``; also ``python -m medmeta.adapters.segmentation.flare``)::

    medmeta-flare --input imagesTs/ --output predictions/ \\
        --support-images imagesTr/ --support-labels labelsTr/ --support-cases 2 \\
        --method prototype --backbone resnet18 --device cuda --amp
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from medmeta.adapters.segmentation.efficiency import EfficiencyMonitor, efficiency_table, write_efficiency_report
from medmeta.adapters.segmentation.metrics import segmentation_scores
from medmeta.adapters.segmentation.slices import VolumeSliceSource, prepare_slices
from medmeta.adapters.segmentation.synthetic_ct import FLARE_LABELS
from medmeta.adapters.segmentation.volumes import (
    case_name,
    from_slices,
    is_nifti_path,
    predict_volume,
    read_volume,
    write_volume,
)
from medmeta.errors import DataFormatError, InsufficientDataError, MissingDataError, exit_on_user_error
from medmeta.threads import apply_num_threads

__all__ = ["list_cases", "pair_cases", "adapt_on_volumes", "run_flare", "build_parser", "main"]


def list_cases(folder: "str | Path") -> list[Path]:
    """The NIfTI files of ``folder``, sorted. Hidden files are ignored; any other file is an
    error naming it (a case would otherwise be skipped silently)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDataError(f"{folder}: input folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    other = [p for p in files if not is_nifti_path(p)]
    if other:
        raise DataFormatError(
            f"{other[0]}: not a NIfTI file (expected only .nii / .nii.gz volumes in {folder}; "
            f"{len(other)} other file(s))"
        )
    if not files:
        raise MissingDataError(f"{folder}: no .nii / .nii.gz volumes found")
    return files


def pair_cases(image_dir: "str | Path", label_dir: "str | Path") -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs matched by case name (``case_0000.nii.gz`` <-> ``case.nii.gz``)."""
    images = list_cases(image_dir)
    labels = {case_name(p): p for p in list_cases(label_dir)}
    missing = [p for p in images if case_name(p) not in labels]
    if missing:
        raise MissingDataError(f"{missing[0]}: no label volume {case_name(missing[0])}.nii.gz in {label_dir}")
    return [(p, labels[case_name(p)]) for p in images]


def _pick_slices(positions: np.ndarray, presence: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``positions``: first the central slice of each label present (so every label has
    an annotated example; more than ``k`` when the labels need it), then evenly spaced ones."""
    chosen: list[int] = []
    for label in range(presence.shape[1]):
        having = np.flatnonzero(presence[:, label])
        if len(having) and not presence[chosen, label].any():
            chosen.append(int(having[len(having) // 2]))
    for j in np.linspace(0, len(positions) - 1, max(k, 1)).round().astype(int):
        if len(chosen) < k and int(j) not in chosen:
            chosen.append(int(j))
    return positions[np.sort(np.asarray(chosen, dtype=np.int64))]


def adapt_on_volumes(
    learner: Any,
    pairs: Sequence[tuple["str | Path", "str | Path"]],
    labels: Mapping[int, str] = FLARE_LABELS,
    axis: int = 2,
    window: Optional[tuple[float, float]] = (40.0, 400.0),
    size: Optional[Sequence[int]] = None,
    slices_per_volume: Optional[int] = None,
    device: "str | torch.device" = "cpu",
) -> Any:
    """Adapt ``learner`` to the slices of annotated support volumes that contain an organ
    (``slices_per_volume`` per volume when given: the central slice of each organ, then evenly
    spaced ones); returns the predictor and the number of support slices."""
    source = VolumeSliceSource.from_files(pairs, labels, axis=axis, window=window, size=size)
    keep = []
    for v in range(source.num_volumes):
        positions = source.volume_positions(v)
        positions = positions[source.labels[positions].any(axis=1)]
        if slices_per_volume is not None and len(positions) > slices_per_volume:
            positions = _pick_slices(positions, source.labels[positions], int(slices_per_volume))
        keep.append(positions)
    positions = np.concatenate(keep)
    if len(positions) == 0:
        raise InsufficientDataError(f"support volumes {[str(p[1]) for p in pairs]}: no slice contains any of the labels {labels}")
    images = source.read_images(positions).to(device)
    masks = source.read_masks(positions).to(device)
    return learner.adapt(images, masks, len(labels)), int(len(positions))


def run_flare(
    input_dir: "str | Path",
    output_dir: "str | Path",
    learner: Any,
    support_pairs: Sequence[tuple["str | Path", "str | Path"]],
    labels: Mapping[int, str] = FLARE_LABELS,
    axis: int = 2,
    window: Optional[tuple[float, float]] = (40.0, 400.0),
    size: Optional[Sequence[int]] = None,
    slices_per_volume: Optional[int] = None,
    batch_size: Optional[int] = 16,
    device: "str | torch.device" = "cpu",
    amp: bool = False,
    sliding_window: Optional[int] = None,
    labels_dir: "str | Path | None" = None,
    tolerance_mm: float = 1.0,
    report_dir: "str | Path | None" = None,
    method: str = "method",
    hd95: bool = False,
) -> pd.DataFrame:
    """Predict every volume of ``input_dir`` into ``output_dir`` (see module doc).

    Returns the report table (a ``setup`` row for building the support set and adapting, one row
    per case, an ``overall`` row over the cases) and writes it as ``efficiency.csv`` / ``efficiency.md`` in ``report_dir`` (default
    ``output_dir``).
    """
    device = torch.device(device)
    cases = list_cases(input_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    label_files: dict[str, Path] = {}
    if labels_dir is not None:
        label_files = {case_name(p): p for p in list_cases(labels_dir)}
        missing = [p for p in cases if case_name(p) not in label_files]
        if missing:
            raise MissingDataError(f"{missing[0]}: no ground truth {case_name(missing[0])}.nii.gz in {labels_dir}")
    if hasattr(learner, "to"):
        learner = learner.to(device)
    if hasattr(learner, "eval"):
        learner.eval()
    monitor = EfficiencyMonitor(device)
    with monitor.measure("setup", method=method) as record:
        predictor, record.extra["slices"] = adapt_on_volumes(learner, support_pairs, labels, axis, window, size, slices_per_volume, device)
    scores: dict[str, dict[str, float]] = {}
    for path in cases:
        name = case_name(path)
        with monitor.measure(name, method=method) as record:
            volume = read_volume(path)
            slices = prepare_slices(volume.data, axis, window)
            record.extra["slices"] = int(len(slices))
            pred = predict_volume(predictor, slices, batch_size=batch_size, device=device, size=size,
                                  window=sliding_window, amp=amp)
            mask = from_slices(pred, axis).astype(np.uint8)
            write_volume(output_dir / f"{name}.nii.gz", mask, volume.affine, header=volume.header, dtype=np.uint8)
        if name in label_files:  # FLARE scores with the ground truth's spacing
            gt = read_volume(label_files[name])
            if gt.shape != mask.shape:
                raise DataFormatError(
                    f"{label_files[name]}: ground truth shape {gt.shape} differs from image shape {mask.shape} of {path}"
                )
            scores[name] = segmentation_scores(mask, gt.data, gt.spacing, labels, tolerance_mm, hd95=hd95)
    rows = []
    for record in monitor.cases[1:]:
        row = record.row()
        row.update(scores.get(record.case, {}))
        rows.append(row)
    # the overall row summarises the cases; adaptation (model start-up) has its own row first
    cases_table = efficiency_table(rows)
    setup = pd.DataFrame([monitor.cases[0].row()]).astype({"slices": "Int64"})
    table = pd.concat([setup, cases_table], ignore_index=True)[list(cases_table.columns)]
    write_efficiency_report(table, report_dir if report_dir is not None else output_dir,
                            title=f"FLARE-style run: {method}")
    return table


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--learner-arg: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmeta-flare",
        description="FLARE-style few-shot segmentation: a folder of .nii.gz volumes in, one mask per case and an "
        "efficiency report out.",
    )
    p.add_argument("--input", required=True, type=Path, help="folder of input volumes (<case>_0000.nii.gz)")
    p.add_argument("--output", required=True, type=Path, help="folder for the predicted masks (<case>.nii.gz)")
    p.add_argument("--support-images", required=True, type=Path, help="folder of annotated support volumes")
    p.add_argument("--support-labels", required=True, type=Path, help="folder of their label volumes")
    p.add_argument("--support-cases", type=int, default=None, help="use the first N support volumes (default all)")
    p.add_argument("--shots", type=int, default=None, help="annotated slices per support volume (default all)")
    p.add_argument("--method", default="prototype", help="segmentation head: prototype, linear, unet")
    p.add_argument("--backbone", default="medmeta_conv4", help="timm backbone name")
    p.add_argument("--weights", default=None, help="local backbone weights (file path or offline source)")
    p.add_argument("--out-indices", type=int, nargs="+", default=None, help="backbone feature levels")
    p.add_argument("--learner-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the head (YAML value), repeatable")
    p.add_argument("--labels", default="FLARE", help="'FLARE' or id:name pairs such as '1:liver,2:kidney'")
    p.add_argument("--axis", type=int, default=2, help="slice axis of the volumes (2: axial for FLARE)")
    p.add_argument("--window", type=float, nargs=2, default=(40.0, 400.0), metavar=("LEVEL", "WIDTH"))
    p.add_argument("--no-window", action="store_true", help="do not window (inputs already scaled to [0, 1])")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize slices for the model")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (0: the whole volume)")
    p.add_argument("--sliding-window", type=int, default=None, help="window size for in-slice sliding windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 autocast on CUDA)")
    p.add_argument("--labels-dir", type=Path, default=None, help="ground truth of the inputs: adds Dice and NSD")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance (FLARE 2021: 1 mm)")
    p.add_argument("--hd95", action="store_true", help="also score the 95th-percentile Hausdorff distance")
    p.add_argument("--report-dir", type=Path, default=None, help="where efficiency.csv/.md go (default --output)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _parse_labels(text: str) -> dict[int, str]:
    if text.upper() == "FLARE":
        return dict(FLARE_LABELS)
    out = {}
    for part in text.split(","):
        key, _, name = part.partition(":")
        try:
            out[int(key)] = name or key
        except ValueError:
            raise SystemExit(f"--labels: expected 'FLARE' or id:name pairs like '1:liver,2:kidney', got {text!r}")
    return out


def main(argv: Optional[Sequence[str]] = None, learner: Any = None) -> int:
    """Command-line entry point; ``learner`` overrides ``--method`` / ``--backbone`` (for
    programmatic use with a custom learner)."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    labels = _parse_labels(args.labels)
    method = args.method if learner is None else type(learner).__name__

    def command(learner: Any) -> Any:
        apply_num_threads()  # torch's CPU threads: $MEDMETA_NUM_THREADS or this process's share
        pairs = pair_cases(args.support_images, args.support_labels)
        if args.support_cases is not None:
            pairs = pairs[: args.support_cases]
        if learner is None:
            from medmeta.adapters.segmentation.heads import create_segmenter
            from medmeta.backbones import create_backbone

            backbone = create_backbone(args.backbone, pretrained=args.weights, out_indices=args.out_indices)
            learner = create_segmenter(args.method, backbone, **_parse_kv(args.learner_arg))
        return run_flare(
            args.input, args.output, learner, pairs, labels=labels, axis=args.axis,
            window=None if args.no_window else tuple(args.window), size=args.size, slices_per_volume=args.shots,
            batch_size=None if args.batch_size == 0 else args.batch_size, device=args.device, amp=args.amp,
            sliding_window=args.sliding_window, labels_dir=args.labels_dir, tolerance_mm=args.tolerance_mm,
            report_dir=args.report_dir, method=method, hd95=args.hd95,
        )

    table = exit_on_user_error("medmeta-flare", command, learner)
    overall = table[table["case"] == "overall"].iloc[0]
    n = int((~table["case"].isin(["setup", "overall"])).sum())
    line = f"medmeta-flare: {n} cases -> {args.output}; {overall['mean_seconds']:.2f} s/case, " \
           f"max memory {overall['memory_max_mb']:.0f} MiB"
    if "dice_mean" in table.columns and not math.isnan(float(overall.get("dice_mean", math.nan))):
        line += f", mean Dice {overall['dice_mean']:.3f}, mean NSD {overall['nsd_mean']:.3f}"
    print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
