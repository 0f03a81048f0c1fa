"""Macenko stain normalisation (Macenko et al., ISBI 2009), usable as a tile transform.

Optical density ``OD = -log((I + 1) / Io)`` of H&E pixels lies near the plane spanned by the
hematoxylin and eosin stain vectors. The method: drop near-transparent pixels (any channel with
OD below ``beta``), take the plane of the two largest eigenvectors of the OD covariance, project,
and take the robust extreme angles (``alpha`` and ``100 - alpha`` percentiles) as the two stain
vectors; concentrations come from least squares, scaled so their 99th percentiles match the
reference, and the image is rebuilt with the reference stain vectors.

The default reference is the H&E stain matrix and maximum concentrations widely used with this
method; :meth:`MacenkoNormalizer.fit` sets the reference from a target image instead.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from medmeta.errors import UserError

__all__ = ["MacenkoNormalizer", "StainNormalizationError", "estimate_stains", "REFERENCE_STAINS", "REFERENCE_MAX_CONC"]

#: Columns: hematoxylin, eosin optical-density unit vectors (R, G, B rows).
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])


class StainNormalizationError(UserError, ValueError):
    """Too few stained pixels to estimate stain vectors (a background tile, a blank image)."""


def _od(image: np.ndarray, io: float) -> np.ndarray:
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"stain normalisation: expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)


def estimate_stains(
    image: np.ndarray,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_pixels: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix ``(3, 2)`` (hematoxylin, eosin columns, unit norm) and the 99th-percentile
    concentrations ``(2,)`` of an H&E image, following Macenko et al. 2009."""
    od = _od(image, io)
    od_hat = od[~np.any(od < beta, axis=1)]
    if len(od_hat) < min_pixels:
        raise StainNormalizationError(
            f"stain normalisation: only {len(od_hat)} stained pixels (optical density >= {beta} in "
            f"every channel), need {min_pixels}; is this a background tile?"
        )
    _, vecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = vecs[:, 1:3].copy()  # the two largest eigenvectors
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1  # the principal direction points into positive optical density
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    proj = od_hat @ plane
    phi = np.arctan2(proj[:, 0], proj[:, 1])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.sin(lo), np.cos(lo)])
    v2 = plane @ np.array([np.sin(hi), np.cos(hi)])
    # Hematoxylin absorbs more red than eosin: the vector with the larger red OD comes first.
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains = stains * np.where(stains.sum(axis=0, keepdims=True) < 0, -1.0, 1.0)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    max_conc = np.percentile(conc, 99, axis=1)
    if not np.all(max_conc > 1e-6):
        raise StainNormalizationError("stain normalisation: degenerate stain concentrations (one stain absent)")
    return stains, max_conc


class MacenkoNormalizer:
    """Map an H&E image to a reference stain appearance; call it on RGB uint8 tiles.

    Args:
        io: transmitted light intensity (background brightness), 240 as in the paper's code.
        alpha: percentile of the robust extreme angles.
        beta: optical-density threshold below which pixels are treated as background.
        on_failure: ``"raise"`` (default) raises :class:`StainNormalizationError` on a tile with
            too little stain; ``"passthrough"`` returns such tiles unchanged.
    """

    def __init__(
        self,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        on_failure: str = "raise",
        stains: Optional[np.ndarray] = None,
        max_conc: Optional[np.ndarray] = None,
    ) -> None:
        if on_failure not in ("raise", "passthrough"):
            raise ValueError(f"on_failure: expected 'raise' or 'passthrough', got {on_failure!r}")
        self.io, self.alpha, self.beta, self.on_failure = float(io), float(alpha), float(beta), on_failure
        self.stains = np.asarray(REFERENCE_STAINS if stains is None else stains, dtype=np.float64)
        self.max_conc = np.asarray(REFERENCE_MAX_CONC if max_conc is None else max_conc, dtype=np.float64)

    def fit(self, target: np.ndarray) -> "MacenkoNormalizer":
        """Take the reference stain vectors and concentrations from a target image."""
        self.stains, self.max_conc = estimate_stains(target, self.io, self.alpha, self.beta)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        try:
            stains, max_conc = estimate_stains(image, self.io, self.alpha, self.beta)
        except StainNormalizationError:
            if self.on_failure == "passthrough":
                return np.asarray(image)
            raise
        od = _od(image, self.io)
        conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
        conc *= (self.max_conc / max_conc)[:, None]
        out = self.io * np.exp(-(self.stains @ conc))
        return np.clip(out.T, 0, 255).round().astype(np.uint8).reshape(np.asarray(image).shape)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.transform(image)

    def __repr__(self) -> str:
        s = np.round(self.stains, 4).tolist()
        return f"MacenkoNormalizer(io={self.io}, alpha={self.alpha}, beta={self.beta}, stains={s})"
