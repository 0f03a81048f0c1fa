"""Synthetic liquid-based cytology slides with known abnormal-cell boxes and ROIs.

A stand-in for the Tianchi cervical cytology slides (20x liquid-based cytology, annotated with
``roi`` regions and ``pos`` abnormal squamous cells) that tests and benchmarks can generate in a
second. The picture follows what a cytologist sees in a ThinPrep/SurePath slide:

* pale glass, with the cells spread over a round smear (so tissue filtering has something to skip);
* normal squamous cells: large, pale, slightly polygonal cytoplasm, a small dark nucleus;
* abnormal cells (the ``pos`` class): a larger, darker, irregular nucleus (high nuclear to
  cytoplasmic ratio, hyperchromasia), on a somewhat smaller, denser cell;
* small dark inflammatory cells as distractors.

Stains absorb light, so every object multiplies the transmitted colour (overlaps darken, as on
glass). Annotated ROIs are rectangles inside the smear; every abnormal cell inside a ROI is
annotated, and some abnormal cells lie outside every ROI, unannotated, as in the challenge where
"outside ROIs there is no guarantee of no abnormal cells". Negative slides have no abnormal cells.

Slides are written as pyramidal TIFFs through :func:`medmeta.adapters.slides.synthetic.write_pyramidal_tiff`
(the real challenge slides came as vendor ``.kfb`` files; medmeta works on TIFF/SVS conversions).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from medmeta.adapters.slides.detection.annotations import SlideAnnotation, write_annotation

__all__ = [
    "SyntheticCytology",
    "SyntheticSlideFiles",
    "make_cytology_image",
    "write_synthetic_cytology_slide",
    "make_synthetic_cytology_set",
]

_GLASS = np.array([240.0, 236.0, 238.0])
_CYTO_COLOURS = np.array([[222.0, 170.0, 190.0], [175.0, 200.0, 222.0], [205.0, 190.0, 215.0]])
_NUCLEUS = np.array([120.0, 90.0, 150.0])
_NUCLEUS_ABNORMAL = np.array([62.0, 38.0, 95.0])
_INFLAMMATORY = np.array([90.0, 70.0, 130.0])


@dataclass
class SyntheticCytology:
    """A generated slide image and what is in it.

    ``annotation`` holds what the challenge would give (ROIs, and the abnormal cells inside them);
    ``abnormal`` and ``normal`` list every cell drawn (``xywh`` level-0), ``smear`` the disc
    ``(cx, cy, radius)`` holding the cells.
    """

    image: np.ndarray
    annotation: SlideAnnotation
    abnormal: np.ndarray
    normal: np.ndarray
    smear: tuple[float, float, float]


@dataclass
class SyntheticSlideFiles:
    """Where a synthetic slide and its annotation were written."""

    slide_id: str
    slide_path: Path
    annotation_path: Path
    truth: SyntheticCytology


def _ellipse_extent(a: float, b: float, theta: float) -> tuple[float, float]:
    """Half width and half height of an ellipse with semi-axes ``a, b`` rotated by ``theta``."""
    c, s = math.cos(theta), math.sin(theta)
    return math.sqrt((a * c) ** 2 + (b * s) ** 2), math.sqrt((a * s) ** 2 + (b * c) ** 2)


def _absorb(
    trans: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    colour: np.ndarray,
    density: float,
    wobble: Optional[np.ndarray] = None,
    edge: float = 1.5,
) -> None:
    """Multiply the transmittance image by an ellipse of stain (soft edge ``edge`` px)."""
    h, w = trans.shape[:2]
    hx, hy = _ellipse_extent(a, b, theta)
    x0, x1 = max(int(cx - hx - edge - 1), 0), min(int(math.ceil(cx + hx + edge + 1)), w)
    y0, y1 = max(int(cy - hy - edge - 1), 0), min(int(math.ceil(cy + hy + edge + 1)), h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = math.cos(theta), math.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if wobble is not None:  # irregular outline: radius modulated by a few harmonics of the angle
        ang = np.arctan2(v, u)
        k = np.arange(1, len(wobble) + 1)
        r = r / (1.0 + np.sum(wobble[:, None, None] * np.cos(k[:, None, None] * ang[None] + k[:, None, None]), axis=0))
    scale = min(a, b)
    alpha = np.clip((1.0 - r) * scale / edge + 0.5, 0.0, 1.0) * density
    t = colour / 255.0
    trans[y0:y1, x0:x1] *= 1.0 - alpha[..., None] * (1.0 - t)


def _sample_positions(
    rng: np.random.Generator,
    n: int,
    sample_one,
    taken: list[tuple[float, float, float]],
    min_gap: float,
    max_tries: int = 60,
) -> list[tuple[float, float, float]]:
    """Rejection-sample ``n`` (x, y, radius) not overlapping ``taken`` by more than ``min_gap``."""
    out = []
    arr = np.array(taken, dtype=np.float64).reshape(-1, 3)
    for _ in range(n):
        for _try in range(max_tries):
            cand = sample_one()
            if cand is None:
                continue
            x, y, r = cand
            if len(arr):
                d = np.hypot(arr[:, 0] - x, arr[:, 1] - y)
                if np.any(d < (arr[:, 2] + r) * min_gap):
                    continue
            out.append(cand)
            arr = np.vstack([arr, [cand]])
            break
    taken.extend(out)
    return out


def make_cytology_image(
    size: tuple[int, int] = (1024, 1024),
    cell_radius: tuple[float, float] = (11.0, 16.0),
    density: float = 0.22,
    n_rois: int = 2,
    roi_size: tuple[int, int] = (320, 320),
    abnormal_per_roi: tuple[int, int] = (3, 6),
    abnormal_outside: int = 3,
    positive: bool = True,
    rois_on_negative: int = 0,
    inflammatory_fraction: float = 0.3,
    smear_fraction: float = 0.46,
    seed: int = 0,
    slide_id: str = "synthetic",
) -> SyntheticCytology:
    """Draw one cytology slide at level 0.

    ``size`` is ``(width, height)``; ``cell_radius`` the range of normal cytoplasm radii (abnormal
    cells are 1.0-1.25x); ``density`` the fraction of the smear covered by cells. A positive
    slide gets ``n_rois`` ROIs of ``roi_size`` with ``abnormal_per_roi`` annotated abnormal cells
    each and ``abnormal_outside`` unannotated ones elsewhere in the smear. A negative slide gets
    none (``rois_on_negative`` ROIs without cells may be added, so that a scorer sees false
    positives there).
    """
    width, height = int(size[0]), int(size[1])
    if width < 64 or height < 64:
        raise ValueError(f"make_cytology_image: size {size} too small (at least 64 x 64)")
    rng = np.random.default_rng(seed)
    r_lo, r_hi = float(cell_radius[0]), float(cell_radius[1])
    cx, cy = width / 2.0, height / 2.0
    radius = smear_fraction * min(width, height)

    def in_smear(x: float, y: float, margin: float) -> bool:
        return math.hypot(x - cx, y - cy) <= radius - margin

    # --- ROIs: non-overlapping rectangles whose corners lie inside the smear
    rois: list[tuple[float, float, float, float]] = []
    n_roi = n_rois if positive else rois_on_negative
    rw, rh = min(roi_size[0], int(radius * 1.3)), min(roi_size[1], int(radius * 1.3))
    for _layout in range(30):  # a new layout when an early ROI leaves no room for the others
        rois = []
        for _ in range(n_roi):
            for _try in range(200):
                x = rng.uniform(cx - radius, cx + radius - rw)
                y = rng.uniform(cy - radius, cy + radius - rh)
                box = (float(int(x)), float(int(y)), float(rw), float(rh))
                corners_in = all(in_smear(px, py, 4.0) for px in (box[0], box[0] + rw) for py in (box[1], box[1] + rh))
                if corners_in and all(box[0] + box[2] + 8 <= o[0] or o[0] + o[2] + 8 <= box[0] or
                                      box[1] + box[3] + 8 <= o[1] or o[1] + o[3] + 8 <= box[1] for o in rois):
                    rois.append(box)
                    break
        if len(rois) == n_roi:
            break
    if len(rois) < n_roi:
        warnings.warn(f"make_cytology_image: only {len(rois)} of {n_roi} ROIs of size {roi_size} fit in the smear "
                      f"of a {width} x {height} slide", stacklevel=2)
    roi_arr = np.array(rois, dtype=np.float64).reshape(-1, 4)

    def crosses_roi(x: float, y: float, r: float) -> bool:
        for rx, ry, rw_, rh_ in rois:
            if x + r > rx - 2 and x - r < rx + rw_ + 2 and y + r > ry - 2 and y - r < ry + rh_ + 2:
                return True
        return False

    taken: list[tuple[float, float, float]] = []
    abnormal_geo: list[tuple[float, float, float]] = []
    annotated_flags: list[bool] = []
    if positive:
        for rx, ry, rw_, rh_ in rois:
            n = int(rng.integers(abnormal_per_roi[0], abnormal_per_roi[1] + 1))

            def one_in_roi(rx=rx, ry=ry, rw_=rw_, rh_=rh_):
                r = rng.uniform(r_lo, r_hi) * rng.uniform(1.0, 1.25)
                if rw_ < 2 * r + 6 or rh_ < 2 * r + 6:
                    return None
                return (rng.uniform(rx + r + 3, rx + rw_ - r - 3), rng.uniform(ry + r + 3, ry + rh_ - r - 3), r)

            got = _sample_positions(rng, n, one_in_roi, taken, 1.05)
            abnormal_geo += got
            annotated_flags += [True] * len(got)

        def one_outside():
            r = rng.uniform(r_lo, r_hi) * rng.uniform(1.0, 1.25)
            ang, rad = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0, 1))
            x, y = cx + rad * math.cos(ang), cy + rad * math.sin(ang)
            if not in_smear(x, y, r) or crosses_roi(x, y, r) or x - r < 1 or y - r < 1:
                return None
            return (x, y, r)

        got = _sample_positions(rng, abnormal_outside, one_outside, taken, 1.05)
        abnormal_geo += got
        annotated_flags += [False] * len(got)

    # --- normal cells fill the smear up to the density
    mean_area = math.pi * ((r_lo + r_hi) / 2) ** 2
    n_normal = int(density * math.pi * radius**2 / mean_area)

    def one_normal():
        r = rng.uniform(r_lo, r_hi)
        ang, rad = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0, 1))
        x, y = cx + rad * math.cos(ang), cy + rad * math.sin(ang)
        if not in_smear(x, y, r * 0.5):
            return None
        return (x, y, r)

    normal_geo = _sample_positions(rng, n_normal, one_normal, taken, 0.8, max_tries=15)

    # --- render: transmittance of glass, then each object absorbs
    trans = np.ones((height, width, 3), dtype=np.float64)
    trans *= (_GLASS / 255.0)[None, None]
    normal_boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    abnormal_boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    cells = [(g, False) for g in normal_geo] + [(g, True) for g in abnormal_geo]
    order = rng.permutation(len(cells))
    for i in order:
        (x, y, r), abnormal = cells[i]
        aspect = rng.uniform(0.7, 1.0)
        theta = rng.uniform(0, math.pi)
        a, b = r, r * aspect
        colour = _CYTO_COLOURS[rng.integers(len(_CYTO_COLOURS))]
        wobble = rng.uniform(-0.06, 0.06, size=3)
        _absorb(trans, x, y, a, b, theta, colour, density=rng.uniform(0.55, 0.8) + (0.15 if abnormal else 0.0),
                wobble=wobble)
        if abnormal:
            nr = r * rng.uniform(0.42, 0.55)
            _absorb(trans, x + rng.normal(0, 0.08 * r), y + rng.normal(0, 0.08 * r), nr, nr * rng.uniform(0.7, 1.0),
                    rng.uniform(0, math.pi), _NUCLEUS_ABNORMAL, density=rng.uniform(0.85, 0.95),
                    wobble=rng.uniform(-0.12, 0.12, size=4), edge=1.0)
        else:
            nr = r * rng.uniform(0.14, 0.22)
            _absorb(trans, x + rng.normal(0, 0.1 * r), y + rng.normal(0, 0.1 * r), nr, nr * rng.uniform(0.8, 1.0),
                    rng.uniform(0, math.pi), _NUCLEUS, density=rng.uniform(0.75, 0.9), edge=1.0)
        hx, hy = _ellipse_extent(a, b, theta)
        x0, y0 = max(x - hx, 0.0), max(y - hy, 0.0)
        x1, y1 = min(x + hx, float(width)), min(y + hy, float(height))
        (abnormal_boxes if abnormal else normal_boxes).append((i, (x0, y0, x1 - x0, y1 - y0)))
    n_inflam = int(inflammatory_fraction * len(normal_geo))
    for _ in range(n_inflam):
        ang, rad = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0, 1))
        ir = rng.uniform(2.0, 3.5) * (r_lo / 11.0)
        _absorb(trans, cx + rad * math.cos(ang), cy + rad * math.sin(ang), ir, ir * rng.uniform(0.7, 1.0),
                rng.uniform(0, math.pi), _INFLAMMATORY, density=0.85, edge=1.0)
    image = trans * 255.0 + rng.normal(0.0, 2.5, size=trans.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # boxes back in the order the cells were generated (annotation order is deterministic)
    abn_sorted = [b for _, b in sorted(abnormal_boxes)]
    nor_sorted = [b for _, b in sorted(normal_boxes)]
    abnormal_arr = np.array(abn_sorted, dtype=np.float64).reshape(-1, 4)
    normal_arr = np.array(nor_sorted, dtype=np.float64).reshape(-1, 4)
    flags = np.array(annotated_flags, dtype=bool)
    ann = SlideAnnotation(slide_id, roi_arr, np.round(abnormal_arr[flags], 1) if len(flags) else np.zeros((0, 4)))
    return SyntheticCytology(image=image, annotation=ann, abnormal=abnormal_arr, normal=normal_arr,
                             smear=(cx, cy, radius))


def _write_tiff(path: Path, image: np.ndarray, mpp: float, tile: int, compression: str) -> Path:
    from medmeta.adapters.slides.synthetic import write_pyramidal_tiff

    return Path(write_pyramidal_tiff(path, image, mpp=mpp, tile=tile, compression=compression))


def write_synthetic_cytology_slide(
    folder: "str | Path",
    slide_id: str,
    positive: bool = True,
    size: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    mpp: float = 0.5,
    tile: int = 256,
    compression: str = "zlib",
    annotation_folder: "str | Path | None" = None,
    **image_kwargs,
) -> SyntheticSlideFiles:
    """Generate a slide, write ``<folder>/<slide_id>.tif`` (pyramidal) and its annotation JSON.

    The annotation goes to ``annotation_folder`` (default: ``folder``) as ``<slide_id>.json``;
    a negative slide's annotation is an empty list (or ROIs only, with ``rois_on_negative``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ann_folder = Path(annotation_folder) if annotation_folder is not None else folder
    truth = make_cytology_image(size=size, positive=positive, seed=seed, slide_id=slide_id, **image_kwargs)
    slide_path = _write_tiff(folder / f"{slide_id}.tif", truth.image, mpp, tile, compression)
    ann_path = write_annotation(ann_folder / f"{slide_id}.json", truth.annotation)
    return SyntheticSlideFiles(slide_id, slide_path, ann_path, truth)


def make_synthetic_cytology_set(
    folder: "str | Path",
    n_positive: int = 2,
    n_negative: int = 1,
    size: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    **kwargs,
) -> list[SyntheticSlideFiles]:
    """A small challenge-like set: ``<folder>/slides/*.tif`` and ``<folder>/annotations/*.json``.

    Slide ids are ``pos_000``, ..., ``neg_000``, ...; each slide gets its own seed derived from
    ``seed``, so sets are reproducible.
    """
    folder = Path(folder)
    out = []
    seeds = np.random.SeedSequence(seed).generate_state(n_positive + n_negative)
    for i in range(n_positive + n_negative):
        positive = i < n_positive
        sid = f"pos_{i:03d}" if positive else f"neg_{i - n_positive:03d}"
        out.append(write_synthetic_cytology_slide(
            folder / "slides", sid, positive=positive, size=size, seed=int(seeds[i]),
            annotation_folder=folder / "annotations", **kwargs))
    return out
