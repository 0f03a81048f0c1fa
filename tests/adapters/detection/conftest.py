"""Fixtures for the detection tests: a small synthetic cytology set and a briefly trained detector."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SLIDE_SIZE = (768, 768)  # test_detection_e2e.py repeats these two
PATCH = 96
TRAIN_ITERATIONS = 120
SYNTH = dict(size=SLIDE_SIZE, roi_size=(200, 200), n_rois=3, abnormal_per_roi=(4, 7), rois_on_negative=1)


@dataclass
class CytologySets:
    root: Path
    train: list
    test: list


@pytest.fixture(scope="session")
def cytology_sets(tmp_path_factory) -> CytologySets:
    """Train (2 positive, 1 negative) and test (2 positive, 1 negative with an empty ROI) slides."""
    from medmeta.adapters.slides.detection.synthetic_cytology import make_synthetic_cytology_set

    root = tmp_path_factory.mktemp("cytology")
    train = make_synthetic_cytology_set(root / "train", n_positive=2, n_negative=1, seed=11, **SYNTH)
    test = make_synthetic_cytology_set(root / "test", n_positive=2, n_negative=1, seed=22, **SYNTH)
    return CytologySets(root, train, test)


@pytest.fixture(scope="session")
def trained_detector(cytology_sets):
    """A RetinaNet on the tiny Conv-4 backbone, trained for a few seconds on 96 px patches; and its checkpoint."""
    from medmeta.adapters.slides.detection.annotations import read_annotation
    from medmeta.adapters.slides.detection.detector import build_detector, save_detector, train_detector
    from medmeta.adapters.slides.detection.patches import DetectionPatchDataset, PatchSampler

    slides = [str(f.slide_path) for f in cytology_sets.train]
    anns = [read_annotation(f.annotation_path) for f in cytology_sets.train]
    anns = [a if len(a.cells) else None for a in anns]
    sampler = PatchSampler(slides, anns, patch_size=PATCH)
    windows = sampler.sample(n_cell=32, n_background=8, n_negative=16, seed=0)
    dataset = DetectionPatchDataset(slides, windows, PATCH, augment=True)
    torch.manual_seed(0)
    model = build_detector(arch="retinanet", backbone="medmeta_conv4_tiny", fpn_channels=32)
    history = train_detector(model, dataset, iterations=TRAIN_ITERATIONS, batch_size=4, lr=2e-3, log=None)
    path = save_detector(cytology_sets.root / "detector.pt", model, extra={"patch_size": PATCH})
    return model, path, history
