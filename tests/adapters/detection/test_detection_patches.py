"""Training patches: crops keep anchor cells whole and inside ROIs, clipping rules, dataset format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta.adapters.slides.detection.annotations import SlideAnnotation, xywh_to_xyxy
from medmeta.adapters.slides.detection.patches import (
    ArraySlide,
    DetectionPatchDataset,
    PatchSampler,
    PatchWindow,
    clip_boxes_to_window,
)
from medmeta.adapters.slides.detection.synthetic_cytology import make_cytology_image


@pytest.fixture(scope="module")
def cyto():
    truth = make_cytology_image(size=(640, 640), roi_size=(200, 200), n_rois=2, abnormal_per_roi=(4, 6), seed=3)
    neg = make_cytology_image(size=(640, 640), positive=False, seed=4)
    return truth, neg


def test_synthetic_truth_is_consistent(cyto):
    truth, neg = cyto
    ann = truth.annotation
    assert len(ann.rois) == 2 and len(ann.cells) >= 8
    assert len(truth.abnormal) > len(ann.cells)  # some abnormal cells lie outside ROIs, unannotated
    for idx in ann.cells_by_roi("inside"):
        assert len(idx) >= 4
    assert sum(len(i) for i in ann.cells_by_roi("inside")) == len(ann.cells)  # annotated cells lie whole in a ROI
    # abnormal cells have dark nuclei: the darkest pixel inside each abnormal box is darker than in normal boxes
    def darkest(boxes):
        return np.array([truth.image[int(y):int(y + h), int(x):int(x + w)].mean(axis=2).min() for x, y, w, h in boxes])
    assert darkest(truth.abnormal).max() < np.median(darkest(truth.normal))
    assert len(neg.abnormal) == 0 and len(neg.annotation.cells) == 0 and len(neg.annotation.rois) == 0
    # pale glass outside the smear
    assert truth.image[:20, :20].mean() > 220


def test_clip_boxes_to_window():
    boxes = np.array([[10, 10, 20, 20], [90, 90, 20, 20], [95, 10, 20, 20]], float)
    out, keep = clip_boxes_to_window(boxes, (0, 0, 100, 100), min_visible=0.25)
    # box 1 keeps 10x10 of 20x20 = 25 %, box 2 keeps 5x20 = 25 %
    np.testing.assert_array_equal(keep, [0, 1, 2])
    np.testing.assert_array_equal(out, [[10, 10, 30, 30], [90, 90, 100, 100], [95, 10, 100, 30]])
    out, keep = clip_boxes_to_window(boxes, (0, 0, 100, 100), min_visible=0.5)
    np.testing.assert_array_equal(keep, [0])
    out, keep = clip_boxes_to_window(boxes, (50, 50, 100, 100), min_visible=0.5)
    np.testing.assert_array_equal(out, [[40, 40, 60, 60]])  # in window coordinates


def test_cell_windows_keep_anchor_whole_inside_roi(cyto):
    truth, neg = cyto
    ann = truth.annotation
    sampler = PatchSampler([ArraySlide(truth.image), ArraySlide(neg.image)], [ann, None], patch_size=64, min_visible=0.6)
    rng = np.random.default_rng(0)
    windows = sampler.cell_windows(40, rng)
    assert len(windows) == 40 and all(w.slide_index == 0 for w in windows)
    cells = xywh_to_xyxy(ann.cells)
    for w in windows:
        inside_roi = any(w.x >= rx and w.y >= ry and w.x + 64 <= rx + rw and w.y + 64 <= ry + rh for rx, ry, rw, rh in ann.rois)
        assert inside_roi
        whole = (cells[:, 0] >= w.x) & (cells[:, 1] >= w.y) & (cells[:, 2] <= w.x + 64) & (cells[:, 3] <= w.y + 64)
        assert whole.any()  # at least the anchor lies whole in the patch
        assert len(w.boxes) >= whole.sum()
        assert (w.boxes >= 0).all() and (w.boxes <= 64).all()
    # every annotated box that is whole in a window appears in its targets, unclipped
    w = windows[0]
    whole = (cells[:, 0] >= w.x) & (cells[:, 1] >= w.y) & (cells[:, 2] <= w.x + 64) & (cells[:, 3] <= w.y + 64)
    expected = cells[whole] - [w.x, w.y, w.x, w.y]
    for e in expected:
        assert np.abs(w.boxes - e).max(axis=1).min() < 1e-3


def test_background_and_negative_windows(cyto):
    truth, neg = cyto
    sampler = PatchSampler([ArraySlide(truth.image), ArraySlide(neg.image)], [truth.annotation, None], patch_size=48)
    rng = np.random.default_rng(1)
    bg = sampler.background_windows(10, rng)
    assert len(bg) >= 5
    cells = xywh_to_xyxy(truth.annotation.cells)
    for w in bg:
        assert len(w.boxes) == 0
        hit = (cells[:, 0] < w.x + 48) & (cells[:, 2] > w.x) & (cells[:, 1] < w.y + 48) & (cells[:, 3] > w.y)
        assert not hit.any()
    negs = sampler.negative_windows(6, rng)
    assert len(negs) == 6 and all(w.slide_index == 1 and len(w.boxes) == 0 for w in negs)
    with pytest.raises(ValueError, match="k=1000 cells asked"):
        sampler.few_shot_windows(1000, rng)


def test_level_scaling_and_out_of_slide_annotation(cyto):
    truth, _ = cyto
    sampler = PatchSampler([ArraySlide(truth.image, levels=2)], [truth.annotation], patch_size=40, level=1)
    w = sampler.cell_windows(5, np.random.default_rng(0))[0]
    assert (w.boxes <= 40).all()  # boxes in level-1 pixels of a 40 px patch (80 level-0 pixels)
    bad = SlideAnnotation("bad", [[600, 600, 100, 100]], [[610, 610, 20, 20]])
    with pytest.raises(ValueError, match="outside slide"):
        PatchSampler([ArraySlide(truth.image)], [bad], patch_size=40).cell_windows(1, np.random.default_rng(0))


def test_dataset_yields_torchvision_targets_and_augments_consistently(cyto):
    truth, _ = cyto
    slide = ArraySlide(truth.image)
    sampler = PatchSampler([slide], [truth.annotation], patch_size=64)
    windows = sampler.cell_windows(12, np.random.default_rng(2))
    plain = DetectionPatchDataset([slide], windows, 64)
    for i in range(len(windows)):
        img, tgt = plain[i]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
        assert tgt["labels"].tolist() == [1] * len(tgt["boxes"]) and len(tgt["boxes"]) >= 1
        np.testing.assert_array_equal(img.permute(1, 2, 0).mul(255).round().byte().numpy(),
                                      truth.image[windows[i].y:windows[i].y + 64, windows[i].x:windows[i].x + 64])
    # flips and transposes move boxes with the pixels: integer boxes hold the same pixel sums after augmentation
    boxes = np.array([[3, 5, 20, 30], [40, 2, 64, 17], [10, 44, 33, 60]], dtype=np.float32)
    wins = [PatchWindow(0, 100 + 7 * k, 120, "cell", boxes, np.ones(3, dtype=np.int64)) for k in range(8)]
    aug = DetectionPatchDataset([slide], wins, 64, augment=True, seed=5)
    ref = DetectionPatchDataset([slide], wins, 64)
    seen = set()
    for i in range(len(wins)):
        (aimg, atgt), (img, tgt) = aug[i], ref[i]
        def sums(im, bx):
            return sorted(float(im[:, int(b[1]):int(b[3]), int(b[0]):int(b[2])].sum()) for b in bx)
        np.testing.assert_allclose(sums(aimg, atgt["boxes"]), sums(img, tgt["boxes"]), rtol=1e-5)
        seen.add(tuple(atgt["boxes"][0].tolist()))
    assert len(seen) > 2  # augmentation did move the boxes
