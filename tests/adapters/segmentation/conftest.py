"""Fixtures of the segmentation adapter tests (shared by the seg_core and seg_heads tests).

* ``synthetic_ct_dir``: three small synthetic CT cases (images/ and labels/, FLARE naming).
* ``IntensityLearner`` / ``intensity_learner``: a stand-in segmentation learner with the heads'
  contract (``adapt(support_images, support_masks, num_labels) -> predictor``), classifying each
  pixel by the Gaussian likelihood of its intensity under each label's support statistics. It
  lets the runner tests run without the heads; on synthetic CT it is a meaningful baseline.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from medmeta.adapters.segmentation.synthetic_ct import write_synthetic_ct_cases

SMALL_CT_SHAPE = (40, 40, 16)
SMALL_CT_SPACING = (1.5, 1.5, 3.0)


@pytest.fixture(scope="session")
def synthetic_ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/images/case_00{0,1,2}_0000.nii.gz`` and ``<dir>/labels/case_00{0,1,2}.nii.gz``."""
    folder = tmp_path_factory.mktemp("synthetic_ct")
    write_synthetic_ct_cases(folder, num_cases=3, shape=SMALL_CT_SHAPE, spacing=SMALL_CT_SPACING, seed=11)
    return folder


class IntensityLearner:
    """Per-label Gaussian intensity model fitted on the support pixels (channel 0)."""

    def __init__(self) -> None:
        self.adapt_calls = 0

    def adapt(self, support_images: Tensor, support_masks: Tensor, num_labels: int):
        if support_images.ndim != 4 or support_masks.shape != (support_images.shape[0], *support_images.shape[2:]):
            raise ValueError(f"bad support shapes {tuple(support_images.shape)} / {tuple(support_masks.shape)}")
        self.adapt_calls += 1
        x = support_images[:, 0].float()
        means, logvars = [], []
        for label in range(num_labels + 1):
            values = x[support_masks == label]
            if values.numel() < 2:
                means.append(torch.tensor(1e3, device=x.device))
                logvars.append(torch.tensor(0.0, device=x.device))
                continue
            means.append(values.mean())
            logvars.append(torch.log(values.var() + 1e-4))
        mean = torch.stack(means).view(1, -1, 1, 1)
        logvar = torch.stack(logvars).view(1, -1, 1, 1)

        def predictor(images: Tensor) -> Tensor:
            v = images[:, :1].float()
            return -0.5 * ((v - mean) ** 2 / logvar.exp() + logvar)

        return predictor


@pytest.fixture
def intensity_learner() -> IntensityLearner:
    return IntensityLearner()
