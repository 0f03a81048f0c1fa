"""Tissue detection finds the known blobs; the tissue fraction of a rectangle is exact."""
from __future__ import annotations

import numpy as np
import pytest

from medmeta.adapters.slides.reader import open_slide
from medmeta.adapters.slides.tissue import TissueMask, detect_tissue, otsu_threshold


def _truth_at(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    fy, fx = mask.shape[0] // h, mask.shape[1] // w
    return mask[: h * fy, : w * fx].reshape(h, fy, w, fx).mean(axis=(1, 3)) > 0.5


@pytest.mark.parametrize("method", ["saturation", "otsu"])
def test_detects_the_known_blobs(synthetic, method):
    s = synthetic("pages", "jpeg")
    mask = detect_tissue(open_slide(s.path), method=method)
    # A small slide gets a mask whose long side is 512: level 2 (downsample 4) is read as it is.
    assert mask.mask.shape == (512, 512) and mask.downsample == (4.0, 4.0)
    truth = _truth_at(s.tissue_mask, mask.mask.shape)
    iou = (truth & mask.mask).sum() / (truth | mask.mask).sum()
    assert iou > 0.9, iou
    assert mask.tissue_fraction == pytest.approx(s.tissue_fraction, abs=0.03)


def test_blank_slide_has_no_tissue(synthetic):
    s = synthetic("pages", "jpeg", blobs=0, size=(1024, 1024))
    for method in ("saturation", "otsu"):
        mask = detect_tissue(open_slide(s.path), method=method)
        assert mask.is_empty, method  # the threshold floor keeps glass noise out


def test_real_slide_tissue_is_found(cmu_svs):
    mask = detect_tissue(open_slide(cmu_svs))  # single level: reduced to a thumbnail
    assert max(mask.mask.shape) == 512
    assert 0.2 < mask.tissue_fraction < 0.99


def test_fraction_is_area_weighted_and_exact():
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    m[3, 3] = True
    tm = TissueMask(m, downsample=(10.0, 10.0), slide_dimensions=(40, 40))
    assert tm.fraction(10, 10, 10, 10) == pytest.approx(1.0)
    assert tm.fraction(5, 5, 10, 10) == pytest.approx(0.25)  # a quarter of the pixel
    assert tm.fraction(10, 10, 20, 10) == pytest.approx(0.5)
    assert tm.fraction(35, 35, 10, 10) == pytest.approx(0.25)  # outside the slide is not tissue
    assert tm.fraction(0, 0, 40, 40) == pytest.approx(2 / 16)
    assert tm.fraction(12, 13, 3, 2) == pytest.approx(1.0)  # smaller than a mask pixel
    np.testing.assert_allclose(tm.fractions(np.array([[10, 10], [5, 5], [0, 0]]), 10), [1.0, 0.25, 0.0])


def test_small_objects_and_holes(synthetic):
    m = np.zeros((40, 40), bool)
    m[5:25, 5:25] = True
    m[12:15, 12:15] = False  # a 9-pixel hole
    m[30:32, 30:32] = True  # a 4-pixel speck
    slide_like = _FakeSlide(m)
    filled = detect_tissue(slide_like, level=0, median_kernel=1, closing_radius=0, fill_holes=True, threshold=100)
    assert filled.mask[13, 13] and filled.mask[30, 30]
    cleaned = detect_tissue(slide_like, level=0, median_kernel=1, closing_radius=0, fill_holes=5 * 64.0,
                            min_object_area=10 * 64.0, threshold=100)
    assert not cleaned.mask[30, 30]  # speck (4 px = 256 level-0 px^2) dropped
    assert not cleaned.mask[13, 13]  # hole (9 px = 576 px^2) larger than 320: kept open
    assert cleaned.mask[6, 6]


class _FakeSlide:
    """Level 0 of 320x320 with a single downsampled level 40x40 drawn from a mask."""

    def __init__(self, mask):
        self.mask = mask
        self.dimensions = (320, 320)
        self.level_dimensions = ((320, 320),)
        self.level_downsamples = (8.0,)

    def _check_level(self, level):
        return level

    def read_level(self, level):
        img = np.full(self.mask.shape + (3,), 240, np.uint8)
        img[self.mask] = (180, 60, 160)
        return img


def test_mask_png_round_trip(tmp_path, synthetic):
    mask = detect_tissue(open_slide(synthetic("pages", "jpeg").path))
    path = mask.save(tmp_path / "mask.png")
    back = TissueMask.load(path)
    np.testing.assert_array_equal(back.mask, mask.mask)
    assert back.downsample == mask.downsample and back.slide_dimensions == mask.slide_dimensions
    assert back.threshold == pytest.approx(mask.threshold)


def test_otsu_threshold_splits_two_modes():
    values = np.concatenate([np.full(100, 20), np.full(100, 200)])
    t = otsu_threshold(values)
    assert 20 <= t < 200


def test_detect_tissue_argument_errors(synthetic):
    r = open_slide(synthetic("pages", "jpeg").path)
    with pytest.raises(ValueError, match="method must be"):
        detect_tissue(r, method="magic")
    with pytest.raises(ValueError, match="median_kernel"):
        detect_tissue(r, median_kernel=4)
