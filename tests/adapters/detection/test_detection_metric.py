"""The Tianchi detection score: hand-computed answers and a pycocotools cross-check."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from medmeta.adapters.slides.detection.annotations import AnnotationError, SlideAnnotation
from medmeta.adapters.slides.detection.metric import (
    average_precision,
    box_iou_xywh,
    evaluate_slide,
    evaluate_slides,
    match_image,
    roi_images,
)

ROIS = np.array([[0, 0, 1000, 1000], [2000, 2000, 500, 500]], dtype=float)
CELLS = np.array([[100, 100, 100, 100], [500, 400, 80, 60], [2100, 2100, 120, 90]], dtype=float)


def _ann() -> SlideAnnotation:
    return SlideAnnotation("s1", ROIS, CELLS)


def test_iou_hand_values():
    a = np.array([[0, 0, 100, 100]], float)
    b = np.array([[25, 0, 100, 100], [100, 0, 10, 10], [0, 0, 50, 50]], float)
    # shifted by 25: intersection 7500, union 12500 -> 0.6; touching edges -> 0; nested quarter -> 0.25
    np.testing.assert_allclose(box_iou_xywh(a, b), [[0.6, 0.0, 0.25]])


def test_perfect_predictions_score_one():
    res = evaluate_slide(_ann(), CELLS, np.array([0.9, 0.8, 0.7]))
    assert res.ap == {0.5: 1.0, 0.7: 1.0}
    assert res.score == 1.0
    assert (res.n_rois, res.n_gt, res.n_pred_in_rois) == (2, 3, 3)


def test_box_at_iou_06_counts_at_05_not_07():
    ann = SlideAnnotation("s", [[0, 0, 1000, 1000]], [[100, 100, 100, 100]])
    res = evaluate_slide(ann, [[125, 100, 100, 100]], [0.9])
    assert res.ap[0.5] == 1.0
    assert res.ap[0.7] == 0.0
    assert res.score == 0.5


def test_predictions_outside_every_roi_are_ignored():
    preds = np.concatenate([CELLS, [[1500, 1500, 100, 100], [3000, 100, 50, 50]]])
    scores = np.array([0.5, 0.4, 0.3, 0.99, 0.98])  # the outside boxes rank first
    assert evaluate_slide(_ann(), preds, scores).score == 1.0
    assert evaluate_slide(_ann(), preds, scores).n_pred_in_rois == 3
    # the same two boxes inside a ROI are false positives ranked first: precision drops
    inside = np.concatenate([CELLS, [[600, 600, 100, 100], [800, 100, 50, 50]]])
    res = evaluate_slide(_ann(), inside, scores)
    # ranks: FP, FP, TP, TP, TP -> precision at each recall step 1/3, 2/4, 3/5; envelope 3/5
    assert res.ap[0.5] == pytest.approx(3 / 5)


def test_roi_rule_center_versus_inside():
    ann = SlideAnnotation("s", [[0, 0, 100, 100]], [[80, 10, 30, 30]])  # centre (95, 25) inside, box pokes out
    assert evaluate_slide(ann, [[80, 10, 30, 30]], [0.9], roi_rule="center").score == 1.0
    res = evaluate_slide(ann, [[80, 10, 30, 30]], [0.9], roi_rule="inside")
    assert res.n_gt == 0 and math.isnan(res.score)
    with pytest.raises(ValueError, match="roi_rule"):
        evaluate_slide(ann, [[80, 10, 30, 30]], [0.9], roi_rule="overlap")


def test_duplicates_are_false_positives():
    ann = SlideAnnotation("s", [[0, 0, 1000, 1000]], [[100, 100, 100, 100], [500, 500, 100, 100]])
    preds = [[100, 100, 100, 100], [102, 100, 100, 100], [500, 500, 100, 100]]
    res = evaluate_slide(ann, preds, [0.9, 0.8, 0.7])
    # TP, FP (duplicate), TP: recall .5 .5 1, precision 1 .5 2/3 -> AP = .5 * 1 + .5 * 2/3
    assert res.ap[0.5] == pytest.approx(0.5 + 0.5 * 2 / 3)
    res101 = evaluate_slide(ann, preds, [0.9, 0.8, 0.7], interpolation="coco101")
    # recall thresholds 0..0.50 (51 of them) at precision 1, 0.51..1.00 (50) at 2/3
    assert res101.ap[0.5] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_matching_is_greedy_by_score():
    gt = np.array([[0, 0, 100, 100]], float)
    preds = np.array([[20, 0, 100, 100], [0, 0, 100, 100]], float)  # IoU 2/3 and 1
    # the higher-scored, worse box takes the ground truth; the perfect one is a duplicate
    np.testing.assert_array_equal(match_image(preds, [0.9, 0.5], gt, 0.5), [True, False])
    np.testing.assert_array_equal(match_image(preds, [0.4, 0.5], gt, 0.5), [False, True])
    # each prediction takes the best *unmatched* ground truth above the threshold
    gts = np.array([[0, 0, 100, 100], [30, 0, 100, 100]], float)
    np.testing.assert_array_equal(match_image([[0, 0, 100, 100], [10, 0, 100, 100]], [0.9, 0.8], gts, 0.5), [True, True])


def test_missed_cells_and_empty_predictions():
    assert average_precision([0.9], [True], n_gt=4) == pytest.approx(0.25)
    assert average_precision([], [], n_gt=3) == 0.0
    assert math.isnan(average_precision([0.9], [False], n_gt=0))
    res = evaluate_slide(_ann(), np.zeros((0, 4)), np.zeros(0))
    assert res.score == 0.0


def test_set_pools_rois_of_all_slides():
    a = SlideAnnotation("a", [[0, 0, 500, 500]], [[10, 10, 50, 50]])
    b = SlideAnnotation("b", [[0, 0, 500, 500]], [[100, 100, 50, 50]])
    neg = SlideAnnotation("neg", [[0, 0, 500, 500]], np.zeros((0, 4)))  # ROI without cells: only FPs
    preds = {
        "a": (np.array([[10, 10, 50, 50]], float), np.array([0.6])),
        "b": (np.array([[100, 100, 50, 50]], float), np.array([0.4])),
        "neg": (np.array([[300, 300, 50, 50]], float), np.array([0.5])),
    }
    res = evaluate_slides({"a": a, "b": b, "neg": neg}, preds)
    assert res.per_slide["a"].score == 1.0 and res.per_slide["b"].score == 1.0
    assert math.isnan(res.per_slide["neg"].score)
    # pooled ranking: TP (.6), FP (.5, negative slide), TP (.4): AP = .5 + .5 * 2/3
    assert res.ap[0.5] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert res.mean_of_slides == 1.0
    with pytest.raises(AnnotationError, match="no annotation"):
        evaluate_slides({"a": a}, {"a": preds["a"], "typo": preds["b"]})


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    anns, preds = {}, {}
    for s in range(3):
        rois = np.array([[0, 0, 400, 400], [600, 0, 300, 300]], float)
        cells = []
        for rx, ry, rw, rh in rois:
            for _ in range(rng.integers(2, 7)):
                w, h = rng.uniform(20, 60, 2)
                cells.append([rng.uniform(rx, rx + rw - w), rng.uniform(ry, ry + rh - h), w, h])
        cells = np.array(cells)
        keep = cells[rng.random(len(cells)) < 0.8]
        tp_like = keep + np.concatenate([rng.normal(0, 5, (len(keep), 2)), rng.normal(0, 4, (len(keep), 2))], 1)
        tp_like[:, 2:] = np.clip(tp_like[:, 2:], 5, None)
        fps = np.concatenate([rng.uniform(0, 850, (8, 2)), rng.uniform(20, 60, (8, 2))], 1)
        dups = keep[: 2] + 3.0
        boxes = np.concatenate([tp_like, fps, dups])
        boxes[:, :2] = np.clip(boxes[:, :2], 0, None)
        scores = rng.permutation(len(boxes)) / len(boxes) + 0.01  # distinct scores
        anns[f"s{s}"] = SlideAnnotation(f"s{s}", rois, cells)
        preds[f"s{s}"] = (boxes, scores)
    return anns, preds


def _coco_ap(anns, preds, roi_rule="center"):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gts, dts = [], [], []
    for sid, ann in anns.items():
        for g, p, s in roi_images(ann, *preds[sid], roi_rule=roi_rule):
            img = len(images) + 1
            images.append({"id": img, "width": 10000, "height": 10000})
            for b in g:
                gts.append({"id": len(gts) + 1, "image_id": img, "category_id": 1, "bbox": [float(v) for v in b],
                            "area": float(b[2] * b[3]), "iscrowd": 0})
            for b, sc in zip(p, s):
                dts.append({"image_id": img, "category_id": 1, "bbox": [float(v) for v in b], "score": float(sc)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "pos"}]}
        coco.createIndex()
        det = coco.loadRes(dts)
        ev = COCOeval(coco, det, "bbox")
        ev.params.iouThrs = np.array([0.5, 0.7])
        ev.params.maxDets = [10000]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, 0, 0, 0]  # (T, R)
    return {0.5: float(prec[0].mean()), 0.7: float(prec[1].mean())}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools(seed):
    anns, preds = _random_case(seed)
    coco = _coco_ap(anns, preds)
    ours101 = evaluate_slides(anns, preds, interpolation="coco101").ap
    ours_all = evaluate_slides(anns, preds).ap
    for t in (0.5, 0.7):
        assert 0.05 < coco[t] < 0.95  # a non-trivial case
        # the same matching and 101-point sampling: equal up to float rounding
        assert ours101[t] == pytest.approx(coco[t], abs=1e-6)
        # all-point area vs 101-point sampling: they differ by the sampling only (at most ~1/101 per step)
        assert ours_all[t] == pytest.approx(coco[t], abs=0.02)
