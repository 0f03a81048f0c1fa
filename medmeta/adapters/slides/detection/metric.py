"""The Tianchi cervical cytology detection score: AP at IoU 0.5 and 0.7 inside ROIs, averaged.

The organisers' description (seed 004): for each slide, predicted boxes are scored only inside
ROI regions; a prediction is correct when its IoU with a ground-truth box passes the threshold;
predictions are ranked by confidence and precision is averaged over recall; AP is computed at IoU
0.5 and 0.7 and the two are averaged. Their code was never published, so this module makes the
open choices explicit:

* **ROIs as images.** Each ROI is one evaluation image: a ground-truth ``pos`` box or a prediction
  belongs to it by ``roi_rule`` (``"center"``: the box centre lies in the ROI, the default;
  ``"inside"``: the whole box does). Predictions outside every ROI are ignored. A box in two
  overlapping ROIs counts in both.
* **Matching** is greedy by score within an image, as in pycocotools: each prediction, in
  descending confidence, takes the not-yet-matched ground truth with the highest IoU at or above
  the threshold; a prediction left without one (a duplicate, a miss) is a false positive.
* **Precision-recall area** is the all-point interpolated area (PASCAL VOC 2010+): precision
  made non-increasing in recall, summed over the recall steps. ``interpolation="coco101"``
  gives COCO's 101-point sampling instead, which matches pycocotools exactly.
* **Over a set**, all ROIs of all slides are pooled as the images of one evaluation (one AP per
  threshold, as a leaderboard computes it); the mean of per-slide scores is reported too. A slide
  or set with no ground truth inside its ROIs has an undefined AP (``nan``), excluded from means.

Slides of the challenge came as vendor ``.kfb`` files; medmeta scores boxes in level-0 pixels of
slides converted to TIFF/SVS, which are the same coordinates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medmeta.adapters.slides.detection.annotations import (
    AnnotationError,
    SlideAnnotation,
    boxes_in_roi,
    read_annotation_folder,
    read_submission,
)

__all__ = [
    "IOU_THRESHOLDS",
    "box_iou_xywh",
    "match_image",
    "average_precision",
    "roi_images",
    "SlideScore",
    "DetectionScore",
    "evaluate_slide",
    "evaluate_slides",
    "score_submission",
]

IOU_THRESHOLDS = (0.5, 0.7)
INTERPOLATIONS = ("all", "coco101")


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``(len(a), len(b))`` of ``xywh`` boxes (continuous coordinates, no +1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, 0][:, None], b[:, 0][None])
    ih = np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, 1][:, None], b[:, 1][None])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(
    pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """True-positive flags of one image's predictions (in the given order), greedy by score.

    Each prediction, in descending score (stable for ties), takes the unmatched ground truth with
    the highest IoU ``>= iou_threshold``; otherwise it is a false positive.
    """
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    tp = np.zeros(len(scores), dtype=bool)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(scores) == 0 or len(gt) == 0:
        return tp
    ious = box_iou_xywh(pred_boxes, gt)
    taken = np.zeros(len(gt), dtype=bool)
    for d in np.argsort(-scores, kind="mergesort"):
        cand = np.where(taken, -1.0, ious[d])
        g = int(np.argmax(cand))
        if cand[g] >= iou_threshold and cand[g] > 0:
            taken[g] = True
            tp[d] = True
    return tp


def average_precision(
    scores: np.ndarray, tp: np.ndarray, n_gt: int, interpolation: str = "all"
) -> float:
    """AP from pooled predictions (scores and TP flags) and the number of ground-truth boxes.

    ``"all"``: all-point interpolated area under the precision-recall curve (VOC 2010+);
    ``"coco101"``: mean interpolated precision at recall 0, 0.01, ..., 1 (pycocotools).
    ``nan`` when there is no ground truth.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}")
    if n_gt <= 0:
        return math.nan
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp = np.asarray(tp, dtype=bool).reshape(-1)
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(tp[order])
    fps = np.cumsum(~tp[order])
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    # precision envelope: the best precision at this recall or any higher one
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    if interpolation == "all":
        prev_recall = np.concatenate([[0.0], recall[:-1]])
        return float(np.sum((recall - prev_recall) * envelope))
    thresholds = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, thresholds, side="left")
    sampled = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(np.mean(sampled))


def roi_images(
    annotation: SlideAnnotation,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    roi_rule: str = "center",
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One ``(gt_boxes, pred_boxes, pred_scores)`` triple per ROI of the slide (``xywh``)."""
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if len(pred_boxes) != len(pred_scores):
        raise ValueError(f"slide {annotation.slide_id}: {len(pred_boxes)} predicted boxes but {len(pred_scores)} scores")
    out = []
    for roi in annotation.rois:
        g = boxes_in_roi(annotation.cells, roi, roi_rule)
        p = boxes_in_roi(pred_boxes, roi, roi_rule)
        out.append((annotation.cells[g], pred_boxes[p], pred_scores[p]))
    return out


def _ap_over_images(
    images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Sequence[float],
    interpolation: str,
) -> dict[float, float]:
    n_gt = sum(len(g) for g, _, _ in images)
    scores = np.concatenate([s for _, _, s in images]) if images else np.zeros(0)
    out = {}
    for t in thresholds:
        tp = np.concatenate([match_image(p, s, g, t) for g, p, s in images]) if images else np.zeros(0, bool)
        out[float(t)] = average_precision(scores, tp, n_gt, interpolation)
    return out


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


@dataclass
class SlideScore:
    """AP per IoU threshold inside the ROIs of one slide; ``score`` is their mean."""

    slide_id: str
    ap: dict[float, float]
    n_rois: int
    n_gt: int
    n_pred_in_rois: int

    @property
    def score(self) -> float:
        return _nanmean(list(self.ap.values()))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"slide_id": self.slide_id, "n_rois": self.n_rois, "n_gt": self.n_gt,
                             "n_pred_in_rois": self.n_pred_in_rois}
        d.update({f"ap{int(round(t * 100))}": v for t, v in self.ap.items()})
        d["score"] = self.score
        return d


@dataclass
class DetectionScore:
    """Scores over a set: pooled AP per threshold (all ROIs of all slides) and per-slide scores."""

    ap: dict[float, float]
    per_slide: dict[str, SlideScore] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The challenge score: the mean of the pooled AP at each IoU threshold."""
        return _nanmean(list(self.ap.values()))

    @property
    def mean_of_slides(self) -> float:
        return _nanmean([s.score for s in self.per_slide.values()])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f"ap{int(round(t * 100))}": v for t, v in self.ap.items()}
        d["score"] = self.score
        d["mean_of_slides"] = self.mean_of_slides
        d["per_slide"] = [s.to_dict() for s in self.per_slide.values()]
        return d


def evaluate_slide(
    annotation: SlideAnnotation,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    roi_rule: str = "center",
    interpolation: str = "all",
) -> SlideScore:
    """Score one slide's predictions (``xywh`` level-0 boxes) inside its ROIs."""
    images = roi_images(annotation, pred_boxes, pred_scores, roi_rule)
    return SlideScore(
        slide_id=annotation.slide_id,
        ap=_ap_over_images(images, iou_thresholds, interpolation),
        n_rois=len(images),
        n_gt=sum(len(g) for g, _, _ in images),
        n_pred_in_rois=sum(len(s) for _, _, s in images),
    )


def evaluate_slides(
    annotations: Mapping[str, SlideAnnotation],
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    roi_rule: str = "center",
    interpolation: str = "all",
) -> DetectionScore:
    """Score a set: ``predictions[slide_id] = (boxes xywh, scores)``; missing slides predict nothing.

    A prediction for a slide without annotation is an error (it would otherwise be silently
    dropped, usually because of a mistyped slide id).
    """
    unknown = sorted(set(predictions) - set(annotations))
    if unknown:
        raise AnnotationError(f"predictions given for slide(s) {unknown[:5]} that have no annotation")
    empty = (np.zeros((0, 4)), np.zeros(0))
    per_slide: dict[str, SlideScore] = {}
    pooled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for sid, ann in annotations.items():
        boxes, scores = predictions.get(sid, empty)
        per_slide[sid] = evaluate_slide(ann, boxes, scores, iou_thresholds, roi_rule, interpolation)
        pooled.extend(roi_images(ann, boxes, scores, roi_rule))
    return DetectionScore(ap=_ap_over_images(pooled, iou_thresholds, interpolation), per_slide=per_slide)


def score_submission(
    submission_dir: "str | Path",
    annotation_dir: "str | Path",
    slide_sizes: Optional[Mapping[str, tuple[int, int]]] = None,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    roi_rule: str = "center",
    interpolation: str = "all",
) -> DetectionScore:
    """Score a submission folder against a folder of annotation JSONs (one per slide scored).

    Negative slides take part when they have an annotation file (an empty list or ROIs only);
    a prediction file for a slide with no annotation file is an error naming the file.
    """
    annotations = read_annotation_folder(annotation_dir, slide_sizes)
    predictions = read_submission(submission_dir, annotations.keys(), slide_sizes)
    return evaluate_slides(annotations, predictions, iou_thresholds, roi_rule, interpolation)
