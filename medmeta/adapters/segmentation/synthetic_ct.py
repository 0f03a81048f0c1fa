"""Seeded synthetic CT-like abdominal volumes with the four FLARE labels, written as NIfTI.

No installed package ships labelled abdominal CT, so the FLARE path (reading, slicing,
few-shot prediction, writing masks, scoring, timing) runs on these: an elliptical body of soft
tissue and fat in air, with the liver (1), both kidneys (2), the spleen (3) and the pancreas (4)
as textured ellipsoids at plausible positions and Hounsfield units, on an anisotropic grid
(default 1.5 x 1.5 x 3 mm, axial slices along the last axis as in FLARE's volumes). Each case
varies the organ positions, sizes and textures with its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from medmeta.adapters.segmentation.volumes import write_volume

__all__ = ["FLARE_LABELS", "SyntheticCase", "make_synthetic_ct", "write_synthetic_ct_cases"]

FLARE_LABELS: dict[int, str] = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
"""FLARE 2021 label ids."""

# Mean HU and texture amplitude per tissue (portal venous phase, rounded).
_TISSUE_HU = {"fat": (-100.0, 20.0), "body": (40.0, 15.0), 1: (110.0, 12.0), 2: (190.0, 20.0), 3: (130.0, 10.0),
              4: (80.0, 15.0)}


@dataclass
class SyntheticCase:
    """One synthetic case: HU image (int16), labels (uint8, FLARE ids), affine and spacing."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _ellipsoid(grid: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Voxels inside an axis-aligned ellipsoid; ``grid``, ``center`` and ``radii`` in mm."""
    total = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    return np.asarray(total <= 1.0)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox)
    std = float(noise.std())
    return noise / std if std > 0 else noise


def make_synthetic_ct(
    shape: Sequence[int] = (64, 64, 32),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    noise_hu: float = 10.0,
) -> SyntheticCase:
    """One seeded case of ``shape`` voxels at ``spacing`` mm.

    The body fills most of the field of view; organ centres and radii are fractions of the body
    size jittered by the seed, so the layout is the same at any resolution. Image = tissue HU +
    smooth texture per tissue + white noise of ``noise_hu``.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape: expected three sizes of at least 8 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing: expected three positive sizes in mm, got {spacing}")
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * np.asarray(spacing)  # field of view in mm
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True)
    centre = extent / 2

    def jitter(scale: float = 0.03) -> np.ndarray:
        return rng.uniform(-scale, scale, 3) * extent

    body_r = extent * np.array([0.46, 0.40, 0.55])
    body = _ellipsoid(grid, centre, body_r)
    inner = _ellipsoid(grid, centre, body_r * 0.85)

    # Organ layout as fractions of the field of view (x: patient right -> left, y: anterior -> posterior).
    organs = {
        1: (np.array([0.33, 0.45, 0.55]), np.array([0.17, 0.17, 0.26])),  # liver, large, right
        3: (np.array([0.70, 0.55, 0.55]), np.array([0.08, 0.10, 0.16])),  # spleen, left posterior
        4: (np.array([0.55, 0.45, 0.45]), np.array([0.13, 0.05, 0.08])),  # pancreas, thin and long
    }
    kidneys = [
        (np.array([0.34, 0.70, 0.40]), np.array([0.06, 0.07, 0.14])),
        (np.array([0.66, 0.70, 0.42]), np.array([0.06, 0.07, 0.14])),
    ]
    label = np.zeros(shape, dtype=np.uint8)
    scale = rng.uniform(0.9, 1.1)
    for lab, (c, r) in organs.items():
        mask = _ellipsoid(grid, c * extent + jitter(), r * extent * scale * rng.uniform(0.9, 1.1, 3)) & inner
        label[mask & (label == 0)] = lab
    for c, r in kidneys:
        mask = _ellipsoid(grid, c * extent + jitter(0.02), r * extent * scale * rng.uniform(0.9, 1.1, 3)) & inner
        label[mask & (label == 0)] = 2

    sigma = [3.0 / s for s in spacing]  # texture correlation length about 3 mm
    image = np.full(shape, -1000.0, dtype=np.float32)
    fat_mean, fat_amp = _TISSUE_HU["fat"]
    body_mean, body_amp = _TISSUE_HU["body"]
    image[body] = fat_mean + fat_amp * _texture(rng, shape, sigma)[body]
    image[inner] = body_mean + body_amp * _texture(rng, shape, sigma)[inner]
    for lab in (1, 2, 3, 4):
        mask = label == lab
        mean, amp = _TISSUE_HU[lab]
        image[mask] = mean + amp * _texture(rng, shape, sigma)[mask]
    image += noise_hu * rng.standard_normal(shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -centre
    return SyntheticCase(image=image, label=label, affine=affine, spacing=spacing)  # type: ignore[arg-type]


def write_synthetic_ct_cases(
    folder: "str | Path",
    num_cases: int = 3,
    shape: Sequence[int] = (64, 64, 32),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    prefix: str = "case",
    image_dir: str = "images",
    label_dir: Optional[str] = "labels",
) -> list[tuple[Path, Optional[Path]]]:
    """Write ``num_cases`` cases in the FLARE / nnU-Net naming: ``<folder>/<image_dir>/
    <prefix>_000_0000.nii.gz`` and ``<folder>/<label_dir>/<prefix>_000.nii.gz`` (no labels when
    ``label_dir`` is None). Case ``i`` uses seed ``seed + i``. Returns the (image, label) paths."""
    folder = Path(folder)
    out = []
    for i in range(int(num_cases)):
        case = make_synthetic_ct(shape, spacing, seed=seed + i)
        name = f"{prefix}_{i:03d}"
        image_path = write_volume(folder / image_dir / f"{name}_0000.nii.gz", case.image, case.affine)
        label_path = None
        if label_dir is not None:
            label_path = write_volume(folder / label_dir / f"{name}.nii.gz", case.label, case.affine)
        out.append((image_path, label_path))
    return out
