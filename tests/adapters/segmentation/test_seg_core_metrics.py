"""Dice, NSD and HD95 against analytic values and an independent brute-force computation.

The brute force builds each surface from scikit-image's marching cubes run once on the whole
mask (triangle areas summed per grid cell), measures cell-to-cell distances with a KD-tree (no
distance transform) and uses scipy's ``directed_hausdorff`` for the maximum distance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import directed_hausdorff
from skimage import measure

from medmeta.adapters.segmentation.metrics import (
    dice,
    hausdorff_distance,
    normalized_surface_dice,
    segmentation_scores,
    surface_distances,
)

SPACING = (0.8, 1.0, 2.5)


def cube(shape, corner, side):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, side))] = True
    return mask


def sphere(shape, spacing, radius_mm):
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grid) <= radius_mm**2


def brute_surface(mask, spacing):
    """Cell positions (mm) and areas of the surface of ``mask``, from one whole-mask mesh."""
    padded = np.pad(mask, 1).astype(np.float64)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.5, spacing=spacing)
    tri = verts[faces]  # (T, 3 corners, 3 coords) in mm
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    areas = 0.5 * np.linalg.norm(cross, axis=1)
    cells = np.floor(tri.mean(axis=1) / np.asarray(spacing) + 1e-9).astype(np.int64)
    unique, inverse = np.unique(cells, axis=0, return_inverse=True)
    cell_areas = np.bincount(inverse.reshape(-1), weights=areas)
    return unique * np.asarray(spacing), cell_areas


def brute_nsd(pred, gt, spacing, tolerance):
    pos_p, area_p = brute_surface(pred, spacing)
    pos_g, area_g = brute_surface(gt, spacing)
    d_gp = cKDTree(pos_p).query(pos_g)[0]
    d_pg = cKDTree(pos_g).query(pos_p)[0]
    return (area_g[d_gp <= tolerance].sum() + area_p[d_pg <= tolerance].sum()) / (area_g.sum() + area_p.sum())


def test_dice_of_shifted_cube_is_analytic():
    gt = cube((30, 30, 30), (5, 5, 5), (12, 12, 12))
    for shift in (0, 1, 3, 7, 12):
        pred = np.roll(gt, shift, axis=0)
        assert dice(pred, gt) == pytest.approx((12 - shift) / 12)


def test_surface_area_matches_whole_mesh_and_sphere():
    mask = sphere((40, 36, 18), SPACING, 10.0)
    d = surface_distances(mask, mask, SPACING)
    _, brute_areas = brute_surface(mask, SPACING)
    assert d["areas_gt"].sum() == pytest.approx(brute_areas.sum(), rel=1e-9)
    assert len(d["areas_gt"]) == len(brute_areas)
    # marching cubes on a coarse staircase overestimates a sphere's area by some percent only
    assert 1.0 < d["areas_gt"].sum() / (4 * math.pi * 10.0**2) < 1.2
    assert np.all(d["distances_gt_to_pred"] == 0)


def test_nsd_of_shifted_cube():
    gt = cube((24, 20, 14), (4, 4, 3), (10, 9, 6))
    shift = 2
    pred = np.roll(gt, shift, axis=0)  # moves the surface 2 * 0.8 = 1.6 mm along axis 0
    # every surface cell of one mask has its translated twin 1.6 mm away: NSD is exactly 1
    assert normalized_surface_dice(pred, gt, SPACING, tolerance_mm=shift * SPACING[0] + 1e-9) == pytest.approx(1.0)
    for tol in (0.0, 0.5, 0.9, 1.5):
        value = normalized_surface_dice(pred, gt, SPACING, tolerance_mm=tol)
        assert value == pytest.approx(brute_nsd(pred, gt, SPACING, tol), abs=1e-12)
        assert 0.0 < value < 1.0
    # shifting along the 2.5 mm axis by one voxel: 1 mm tolerance misses the moved faces
    pred_z = np.roll(gt, 1, axis=2)
    assert normalized_surface_dice(pred_z, gt, SPACING, 2.5 + 1e-9) == pytest.approx(1.0)
    assert normalized_surface_dice(pred_z, gt, SPACING, 1.0) == pytest.approx(brute_nsd(pred_z, gt, SPACING, 1.0))
    assert normalized_surface_dice(pred_z, gt, SPACING, 1.0) < 1.0


@pytest.mark.parametrize("operation", ["dilate", "erode"])
def test_nsd_and_hd_of_dilated_and_eroded_sphere(operation):
    gt = sphere((36, 30, 16), SPACING, 9.0)
    change = ndimage.binary_dilation if operation == "dilate" else ndimage.binary_erosion
    pred = change(gt, iterations=2)
    assert dice(pred, gt) == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    for tol in (0.5, 0.9, 1.5, 2.2, 6.0):
        assert normalized_surface_dice(pred, gt, SPACING, tol) == pytest.approx(
            brute_nsd(pred, gt, SPACING, tol), abs=1e-12
        )
    assert normalized_surface_dice(pred, gt, SPACING, 6.0) == pytest.approx(1.0)
    # the full Hausdorff distance against scipy's directed_hausdorff on the cell positions
    pos_p, _ = brute_surface(pred, SPACING)
    pos_g, _ = brute_surface(gt, SPACING)
    expected = max(directed_hausdorff(pos_p, pos_g)[0], directed_hausdorff(pos_g, pos_p)[0])
    assert hausdorff_distance(pred, gt, SPACING, percent=100) == pytest.approx(expected, rel=1e-12)
    hd95 = hausdorff_distance(pred, gt, SPACING)
    assert 0 < hd95 <= expected


def test_metrics_in_2d_match_a_circle():
    mask = sphere((80, 60), (0.5, 0.7), 12.0)
    d = surface_distances(mask, mask, (0.5, 0.7))
    assert d["areas_gt"].sum() == pytest.approx(2 * math.pi * 12.0, rel=0.1)
    contour_length = sum(
        np.linalg.norm(np.diff(c * np.array([0.5, 0.7]), axis=0), axis=1).sum()
        for c in measure.find_contours(np.pad(mask, 1).astype(float), 0.5)
    )
    assert d["areas_gt"].sum() == pytest.approx(contour_length, rel=1e-9)
    assert normalized_surface_dice(np.roll(mask, 3, 0), mask, (0.5, 0.7), 1.5 + 1e-9) == pytest.approx(1.0)


def test_empty_masks_have_defined_results():
    empty = np.zeros((10, 10, 10), dtype=bool)
    full = cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    assert dice(empty, empty) == 1.0
    assert normalized_surface_dice(empty, empty, SPACING) == 1.0
    assert hausdorff_distance(empty, empty, SPACING) == 0.0
    for pred, gt in ((empty, full), (full, empty)):
        assert dice(pred, gt) == 0.0
        assert normalized_surface_dice(pred, gt, SPACING) == 0.0
        assert hausdorff_distance(pred, gt, SPACING) == math.inf
        assert hausdorff_distance(pred, gt, SPACING, empty_distance=373.0) == 373.0


def test_segmentation_scores_per_label_and_errors():
    gt = np.zeros((20, 20, 10), dtype=np.int64)
    gt[2:8, 2:8, 2:6] = 1
    gt[10:16, 10:16, 2:6] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # label 2 missed entirely
    row = segmentation_scores(torch.from_numpy(pred), gt, SPACING, labels={1: "liver", 2: "kidney", 3: "spleen"})
    assert row["dice_liver"] == 1.0 and row["nsd_liver"] == 1.0 and row["hd95_liver"] == 0.0
    assert row["dice_kidney"] == 0.0 and row["nsd_kidney"] == 0.0 and row["hd95_kidney"] == math.inf
    assert row["dice_spleen"] == 1.0 and row["nsd_spleen"] == 1.0  # absent in both
    assert row["dice_mean"] == pytest.approx(2 / 3)
    assert row["hd95_mean"] == 0.0  # over finite values
    with pytest.raises(ValueError, match="spacing"):
        normalized_surface_dice(gt == 1, gt == 1, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        normalized_surface_dice(gt == 1, gt == 1, (1.0, 1.0))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(gt[:5], gt)
