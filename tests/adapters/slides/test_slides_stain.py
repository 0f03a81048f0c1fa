"""Macenko stain normalisation: recovers known stain vectors and maps one staining onto another."""
from __future__ import annotations

import numpy as np
import pytest

from medmeta.adapters.slides.stain import (
    REFERENCE_STAINS,
    MacenkoNormalizer,
    StainNormalizationError,
    estimate_stains,
)


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


H_A = np.stack([_unit([0.65, 0.70, 0.29]), _unit([0.27, 0.90, 0.34])], axis=1)
H_B = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0)


def _concentrations(n=96 * 96, seed=0):
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)  # hematoxylin-rich, eosin-rich, mixed pixels
    c = np.zeros((2, n))
    c[0] = np.where(kind == 0, rng.uniform(0.3, 1.5, n), rng.uniform(0, 0.1, n))
    c[1] = np.where(kind == 1, rng.uniform(0.3, 1.0, n), rng.uniform(0, 0.1, n))
    c[:, kind == 2] = rng.uniform(0.2, 0.8, (2, int((kind == 2).sum())))
    return c


def _render(stains, conc, side=96):
    return np.clip(240 * np.exp(-(stains @ conc)), 0, 255).round().astype(np.uint8).T.reshape(side, side, 3)


def test_recovers_known_stain_vectors():
    stains, max_conc = estimate_stains(_render(H_A, _concentrations()))
    cos = (stains * H_A).sum(axis=0)
    assert cos[0] > 0.999 and cos[1] > 0.999  # hematoxylin first, eosin second
    assert max_conc[0] == pytest.approx(np.percentile(_concentrations()[0], 99), rel=0.05)


def test_maps_one_staining_onto_the_reference():
    conc = _concentrations()
    source, target = _render(H_A, conc), _render(H_B, conc)
    out = MacenkoNormalizer().fit(target)(source)
    assert out.shape == source.shape and out.dtype == np.uint8
    before = np.abs(source.astype(int) - target.astype(int)).mean()
    after = np.abs(out.astype(int) - target.astype(int)).mean()
    assert before > 10 and after < 1.5


def test_blank_tiles_raise_or_pass_through():
    blank = np.full((32, 32, 3), 245, np.uint8)
    with pytest.raises(StainNormalizationError, match="background tile"):
        MacenkoNormalizer()(blank)
    np.testing.assert_array_equal(MacenkoNormalizer(on_failure="passthrough")(blank), blank)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        MacenkoNormalizer()(blank.astype(float))
