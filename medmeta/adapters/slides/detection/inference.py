"""Detect cells over whole slides: sliding window over tissue, merge across tiles, write submissions.

:func:`detect_slide` tiles the slide with the slide adapter's tiler
(:func:`medmeta.adapters.slides.tiling.tile_slide`, tissue filtering included; ``min_tissue=0``
reads every tile), adds the right and bottom edge tiles a regular grid leaves out, runs the
detector on batches of tiles, and maps boxes to level-0 slide coordinates. Tiles overlap by
``overlap`` pixels so that every cell smaller than the overlap lies whole in at least one tile;
boxes cut by an inner tile edge are dropped when a neighbouring tile holds the same area whole,
and the rest are merged by non-maximum suppression in slide coordinates
(``torchvision.ops.batched_nms``, per class).

:func:`run_inference` does this for many slides and writes one ``<slide id>.json`` per slide in
the Tianchi submission format (``{"x", "y", "w", "h", "p"}`` level-0 boxes); the command line
lives in :mod:`medmeta.adapters.slides.detection.cli`.

The challenge's slides came as vendor ``.kfb`` files; medmeta reads TIFF/SVS conversions (or
``.kfb`` through the optional ``kfbslide`` backend of the slide reader).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from medmeta.adapters.slides.detection.annotations import write_predictions, xyxy_to_xywh
from medmeta.adapters.slides.detection.detector import predict_images
from medmeta.errors import DataFormatError
from medmeta.modes import module_mode

__all__ = ["CYTOLOGY_TISSUE", "SlideDetections", "detection_grid", "detect_slide", "run_inference", "slide_id_of", "SLIDE_SUFFIXES"]

log = logging.getLogger(__name__)

#: Tissue detection for cytology: no median blur (it erases isolated cells at thumbnail scale) and
#: a wide closing that joins neighbouring cells into one smear region.
CYTOLOGY_TISSUE: dict[str, Any] = {"median_kernel": 1, "closing_radius": 8}

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".kfb")


def slide_id_of(path: "str | Path") -> str:
    """The slide id used for the submission file name: the file name without its extension."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class SlideDetections:
    """Detections of one slide: ``boxes`` ``xyxy`` level-0, ``scores``, ``labels``, and timings (s)."""

    slide_id: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    n_tiles: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def boxes_xywh(self) -> np.ndarray:
        return xyxy_to_xywh(self.boxes)

    def summary(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "n_tiles": self.n_tiles, "n_cells": int(len(self.scores)),
            "seconds": round(self.seconds, 4), "tiles_per_s": self.n_tiles / self.seconds if self.seconds > 0 else None,
            **{f"{k}_s": round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class _Grid:
    coords: np.ndarray  # (N, 2) level-0 x, y
    level: int
    read_size: int
    tile_size: int
    footprint: float  # level-0 edge of a tile
    stride: float  # level-0 step between neighbours


def detection_grid(
    slide: Any,
    tile_size: int = 512,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    overlap: int = 64,
    min_tissue: float = 0.02,
    tissue_mask: Any = None,
    tissue_kwargs: Optional[dict[str, Any]] = None,
) -> _Grid:
    """Tiles covering the slide's tissue (every tile with ``min_tissue=0``), edges included.

    The tiler's regular grid stops where a full tile no longer fits; detection must see the
    whole slide, so tiles flush with the right and bottom edges are added (and filtered by the
    same tissue mask). A slide smaller than a tile gets one tile (reads past the edge are white).

    Without a ``tissue_mask``, one is computed with :func:`medmeta.adapters.slides.tissue.detect_tissue`
    and :data:`CYTOLOGY_TISSUE` settings (overridden by ``tissue_kwargs``): cytology smears are
    sparse, and the histology defaults (a 7 px median blur at 1/32) erase isolated cells.
    """
    from medmeta.adapters.slides.errors import NoTissueError
    from medmeta.adapters.slides.tiling import tile_slide
    from medmeta.adapters.slides.tissue import detect_tissue

    if min_tissue > 0 and tissue_mask is None:
        tissue_mask = detect_tissue(slide, **{**CYTOLOGY_TISSUE, **(tissue_kwargs or {})})
    if level is None and mpp is None:
        level = 0
    lvl = level if level is not None else None
    w0, h0 = slide.dimensions
    try:
        grid = tile_slide(slide, tile_size, mpp=mpp, level=lvl, overlap=overlap, min_tissue=min_tissue,
                          tissue_mask=tissue_mask, snap_to_tiles=False)
        coords, lvl, read, ds = grid.coords, grid.level, grid.read_size, grid.level_downsample
    except NoTissueError:
        log.warning("slide %s: no tissue tile found; nothing to detect", getattr(slide, "path", slide))
        lvl = level if level is not None else 0
        ds = float(slide.level_downsamples[lvl])
        return _Grid(np.zeros((0, 2), np.int64), lvl, tile_size, tile_size, tile_size * ds, (tile_size - overlap) * ds)
    except ValueError as err:  # a slide smaller than one tile
        if "smaller than one tile" not in str(err):
            raise
        lvl = level if level is not None else 0
        ds = float(slide.level_downsamples[lvl])
        return _Grid(np.zeros((1, 2), np.int64), lvl, tile_size, tile_size, tile_size * ds, (tile_size - overlap) * ds)
    footprint = read * ds
    stride_level = max(1, int(round((tile_size - overlap) * read / tile_size)))
    stride = stride_level * ds
    # edge tiles: last column / row flush with the slide edge when the grid leaves a strip
    lw, lh = slide.level_dimensions[lvl]
    xs = np.arange(0, lw - read + 1, stride_level)
    ys = np.arange(0, lh - read + 1, stride_level)
    extra = []
    ex = lw - read if len(xs) and xs[-1] + read < lw else None
    ey = lh - read if len(ys) and ys[-1] + read < lh else None
    if ex is not None:
        extra += [(ex, y) for y in ys]
    if ey is not None:
        extra += [(x, ey) for x in xs]
    if ex is not None and ey is not None:
        extra.append((ex, ey))
    if extra:
        e = np.ceil(np.array(extra, dtype=np.float64) * ds - 1e-6).astype(np.int64)
        if min_tissue > 0:
            e = e[tissue_mask.fractions(e, footprint) >= min_tissue]
        coords = np.unique(np.concatenate([coords, e]), axis=0)
    return _Grid(np.asarray(coords, np.int64).reshape(-1, 2), lvl, read, tile_size, footprint, stride)


def _read_tile(slide: Any, grid: _Grid, xy: np.ndarray) -> np.ndarray:
    region = slide.read_region((int(xy[0]), int(xy[1])), grid.level, (grid.read_size, grid.read_size))
    if grid.read_size != grid.tile_size:
        from PIL import Image

        region = np.asarray(Image.fromarray(region).resize((grid.tile_size, grid.tile_size), Image.Resampling.BILINEAR))
    return region


def _drop_cut_boxes(
    boxes: np.ndarray, tile_xy: np.ndarray, grid: _Grid, present: dict, slide_size: tuple[int, int], margin: float
) -> np.ndarray:
    """Keep-mask of a tile's boxes: drop those touching an inner edge that a neighbour tile holds whole."""
    if len(boxes) == 0:
        return np.ones(0, dtype=bool)
    x, y = float(tile_xy[0]), float(tile_xy[1])
    f = grid.footprint
    # a tile edge within one read pixel of the slide border lies on it (level sizes are rounded)
    w0, h0 = (float(v) - grid.footprint / grid.read_size for v in slide_size)
    touch = (
        ((boxes[:, 0] <= x + margin) & (x > 0))
        | ((boxes[:, 1] <= y + margin) & (y > 0))
        | ((boxes[:, 2] >= x + f - margin) & (x + f < w0))
        | ((boxes[:, 3] >= y + f - margin) & (y + f < h0))
    )
    keep = ~touch
    if not touch.any():
        return keep
    kx, ky = int(x // grid.stride), int(y // grid.stride)
    reach = range(-int(np.ceil(f / grid.stride)) - 1, int(np.ceil(f / grid.stride)) + 2)  # tiles overlapping this one
    neigh = [xy for dx in reach for dy in reach for xy in present.get((kx + dx, ky + dy), ()) if xy != (x, y)]
    for i in np.flatnonzero(touch):
        b = boxes[i]
        # a neighbour holds the box whole when it is clear of the neighbour's inner edges; an edge
        # lying on the slide border cuts nothing, so a box may touch it (cells at the slide edge)
        held = any(
            (nx <= 0 or nx + margin < b[0]) and (ny <= 0 or ny + margin < b[1])
            and (nx + f >= w0 or b[2] < nx + f - margin) and (ny + f >= h0 or b[3] < ny + f - margin)
            for nx, ny in neigh
        )
        keep[i] = not held
    return keep


@torch.no_grad()
def detect_slide(
    model: nn.Module,
    slide: Any,
    tile_size: int = 512,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    overlap: int = 64,
    min_tissue: float = 0.02,
    tissue_mask: Any = None,
    tissue_kwargs: Optional[dict[str, Any]] = None,
    batch_size: int = 8,
    score_threshold: float = 0.05,
    nms_iou: float = 0.3,
    drop_cut_boxes: bool = True,
    border_margin: float = 2.0,
    max_detections: Optional[int] = None,
    slide_id: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SlideDetections:
    """Detect cells on one slide (a path or an opened reader); boxes in level-0 pixels.

    ``tile_size`` and ``overlap`` are in pixels of the read scale (``level``, or ``mpp``
    resolved by the tiler); use the scale the detector was trained at. ``overlap`` should exceed
    the largest cell. ``min_tissue=0`` disables tissue filtering. ``progress(done, total)`` is
    called after each batch.
    """
    from medmeta.adapters.slides.reader import open_slide

    t_start = time.perf_counter()
    if not hasattr(slide, "read_region"):
        slide = open_slide(slide)
    sid = slide_id or slide_id_of(getattr(slide, "path", None) or "slide")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"detect_slide: overlap must be in [0, tile_size), got {overlap}")
    grid = detection_grid(slide, tile_size, level, mpp, overlap, min_tissue, tissue_mask, tissue_kwargs)
    t_grid = time.perf_counter() - t_start
    scale = grid.footprint / grid.tile_size
    present: dict[tuple[int, int], list[tuple[float, float]]] = {}  # tiles bucketed by stride cell
    for x, y in grid.coords:
        present.setdefault((int(x // grid.stride), int(y // grid.stride)), []).append((float(x), float(y)))
    all_boxes, all_scores, all_labels = [], [], []
    t_read = t_model = t_post = 0.0
    n = len(grid.coords)
    with module_mode(model, False):
        for start in range(0, n, batch_size):
            t0 = time.perf_counter()
            chunk = grid.coords[start:start + batch_size]
            tiles = np.stack([_read_tile(slide, grid, xy) for xy in chunk])
            t1 = time.perf_counter()
            outputs = predict_images(model, torch.from_numpy(tiles))
            t2 = time.perf_counter()
            for xy, out in zip(chunk, outputs):
                s = out["scores"].detach().cpu().numpy().astype(np.float64)
                keep = s >= score_threshold
                if not keep.any():
                    continue
                b = out["boxes"].detach().cpu().numpy().astype(np.float64)[keep] * scale
                b += np.array([xy[0], xy[1], xy[0], xy[1]], dtype=np.float64)
                lab = out["labels"].detach().cpu().numpy()[keep]
                s = s[keep]
                if drop_cut_boxes and overlap > 0:
                    k = _drop_cut_boxes(b, xy, grid, present, slide.dimensions, border_margin * scale)
                    b, s, lab = b[k], s[k], lab[k]
                all_boxes.append(b)
                all_scores.append(s)
                all_labels.append(lab)
            t_read += t1 - t0
            t_model += t2 - t1
            t_post += time.perf_counter() - t2
            if progress is not None:
                progress(min(start + batch_size, n), n)
    t0 = time.perf_counter()
    if all_boxes:
        boxes = np.concatenate(all_boxes)
        scores = np.concatenate(all_scores)
        labels = np.concatenate(all_labels)
        w0, h0 = slide.dimensions
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w0)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h0)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64)),
                           nms_iou).numpy()
        if max_detections is not None:
            keep = keep[:max_detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    else:
        boxes, scores, labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    t_merge = time.perf_counter() - t0
    return SlideDetections(
        slide_id=sid, boxes=boxes, scores=scores, labels=labels, n_tiles=n,
        seconds=time.perf_counter() - t_start,
        timings={"tiling": t_grid, "reading": t_read, "model": t_model, "postprocess": t_post + t_merge},
    )


def run_inference(
    model: nn.Module,
    slides: Sequence["str | Path"],
    out_dir: "str | Path",
    log_fn: Optional[Callable[[str], None]] = print,
    on_error: str = "raise",
    **detect_kwargs: Any,
) -> list[SlideDetections]:
    """Detect on each slide and write ``<out_dir>/<slide id>.json`` (the submission folder).

    Labels are not part of the submission format: every class counts as ``pos``. With
    ``on_error="skip"`` a slide that fails to open is reported and skipped (no file is written
    for it), otherwise the error is raised naming the slide.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"run_inference: on_error must be 'raise' or 'skip', got {on_error!r}")
    from medmeta.adapters.slides.errors import SlideError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [slide_id_of(p) for p in slides]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataFormatError(f"run_inference: several slides share the id(s) {dup[:5]} (file name without extension)")
    results = []
    t0 = time.perf_counter()
    for k, path in enumerate(slides):
        try:
            det = detect_slide(model, path, slide_id=ids[k], **detect_kwargs)
        except SlideError as err:
            if on_error == "raise":
                raise
            if log_fn is not None:
                log_fn(f"[detect] {k + 1}/{len(slides)} {ids[k]}: skipped ({err})")
            continue
        write_predictions(out_dir, det.slide_id, det.boxes_xywh, det.scores)
        results.append(det)
        if log_fn is not None:
            s = det.summary()
            log_fn(f"[detect] {k + 1}/{len(slides)} {det.slide_id}: {s['n_tiles']} tiles, {s['n_cells']} cells, "
                   f"{det.seconds:.2f} s ({s['tiles_per_s'] or 0:.1f} tiles/s); total {time.perf_counter() - t0:.1f} s")
    return results
