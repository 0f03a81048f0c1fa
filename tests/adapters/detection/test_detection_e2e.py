"""End to end on synthetic cytology slides: train briefly, predict a submission folder, score it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmeta.adapters.slides.detection.annotations import read_annotation, read_annotation_folder
from medmeta.adapters.slides.detection.cli import main
from medmeta.adapters.slides.detection.detector import (
    adapt_classification_head,
    classification_head_parameters,
    reset_classification_head,
)
from medmeta.adapters.slides.detection.inference import detect_slide
from medmeta.adapters.slides.detection.metric import evaluate_slides, score_submission
from medmeta.adapters.slides.detection.patches import DetectionPatchDataset, PatchSampler

PATCH = 96  # the patch size the conftest detector was trained on
SLIDE_SIZE = (768, 768)


def _baselines(annotations) -> dict[str, float]:
    """Trivial submissions: random cell-sized boxes, and a fixed grid of boxes with constant scores."""
    rng = np.random.default_rng(0)
    w, h = SLIDE_SIZE
    random_preds, grid_preds = {}, {}
    sizes = np.concatenate([a.cells[:, 2:] for a in annotations.values() if len(a.cells)])
    cw, ch = sizes.mean(axis=0)
    gx, gy = np.meshgrid(np.arange(0, w - cw, cw), np.arange(0, h - ch, ch))
    grid = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, cw), np.full(gx.size, ch)], axis=1)
    for sid in annotations:
        n = 400
        xy = rng.uniform(0, [w - cw, h - ch], size=(n, 2))
        random_preds[sid] = (np.concatenate([xy, rng.uniform(0.7, 1.3, (n, 2)) * [cw, ch]], 1), rng.uniform(size=n))
        grid_preds[sid] = (grid, np.full(len(grid), 0.5))
    return {"random": evaluate_slides(annotations, random_preds).score, "grid": evaluate_slides(annotations, grid_preds).score}


@pytest.mark.slow
def test_train_predict_write_and_score(cytology_sets, trained_detector, tmp_path):
    model, ckpt, history = trained_detector
    assert np.mean([h["loss"] for h in history[-20:]]) < np.mean([h["loss"] for h in history[:20]])
    test_root = cytology_sets.test[0].slide_path.parent.parent
    sub = tmp_path / "submission"
    report = tmp_path / "report.json"
    rc = main(["predict", "--checkpoint", str(ckpt), "--slides", str(test_root / "slides"), "--out", str(sub),
               "--tile-size", "256", "--overlap", "48", "--batch-size", "4", "--report", str(report), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in sub.iterdir()) == ["neg_000.json", "pos_000.json", "pos_001.json"]
    timing = json.loads(report.read_text())
    assert all(s["n_tiles"] > 0 and s["seconds"] > 0 for s in timing["slides"])

    score = score_submission(sub, test_root / "annotations")
    annotations = read_annotation_folder(test_root / "annotations")
    assert sum(a.cells.shape[0] for a in annotations.values()) >= 10
    base = _baselines(annotations)
    assert max(base.values()) < 0.1
    assert score.score > max(base.values()) + 0.4, (score.to_dict(), base)
    assert score.ap[0.5] >= score.ap[0.7]
    assert np.isnan(score.per_slide["neg_000"].score)  # no cells: undefined, but its FPs count in the pooled AP

    rc = main(["score", "--submission", str(sub), "--annotations", str(test_root / "annotations"), "--quiet",
               "--json", str(tmp_path / "score.json")])
    assert rc == 0
    assert json.loads((tmp_path / "score.json").read_text())["score"] == pytest.approx(score.score)


@pytest.mark.slow
def test_few_shot_adapts_only_the_classification_head(cytology_sets, trained_detector):
    source, ckpt, _ = trained_detector
    from medmeta.adapters.slides.detection.detector import load_detector

    model = load_detector(ckpt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_ids = {id(p) for p in classification_head_parameters(model)}
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    assert head_names and all(n.startswith("head.classification_head") for n in head_names)

    test = cytology_sets.test
    slide = str(test[0].slide_path)
    ann = read_annotation(test[0].annotation_path)

    def score_on(m):
        det = detect_slide(m, slide, tile_size=256, overlap=48, batch_size=4)
        return evaluate_slides({ann.slide_id: ann}, {ann.slide_id: (det.boxes_xywh, det.scores)}).score

    # K = 5 annotated cells of another slide (the first test slide's sibling), head re-initialised
    support_ann = read_annotation(test[1].annotation_path)
    sampler = PatchSampler([str(test[1].slide_path)], [support_ann], patch_size=PATCH)
    windows = sampler.few_shot_windows(5, np.random.default_rng(0))
    assert len(windows) == 5 and all(len(w.boxes) >= 1 for w in windows)
    support = DetectionPatchDataset([str(test[1].slide_path)], windows, PATCH, augment=True)
    torch.manual_seed(0)
    reset_classification_head(model)
    reset_score = score_on(model)
    adapt_classification_head(model, support, steps=40, lr=5e-3, batch_size=5)
    adapted_score = score_on(model)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in head_names)
    frozen_changed = [n for n, p in model.named_parameters() if n not in head_names and not torch.equal(p, before[n])]
    assert frozen_changed == []
    assert all(p.requires_grad for p in model.parameters())  # trainability restored afterwards
    assert adapted_score > reset_score + 0.2, (reset_score, adapted_score)
