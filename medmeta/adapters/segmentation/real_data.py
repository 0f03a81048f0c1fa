"""Real segmentation images that installed packages ship: no downloads, no network.

The files are located and read by :mod:`medmeta.recipes.package_images` (the one locator,
:mod:`medmeta.recipes.package_files`, names each file once); this module turns them into
segmentation data:

* :func:`nuclei_2d`: stardist's fluorescence microscopy image of nuclei (2018 Kaggle Data
  Science Bowl; Caicedo et al., Nature Methods 2019) with its instance mask, 512 x 512;
  :func:`nuclei_3d` its small synthetic 3-D nuclei volume (stardist is not imported: it pulls
  in TensorFlow-era dependencies; ``pip install --no-deps stardist`` suffices).
* :func:`mni152_volume` / :func:`mni152_slices`: nilearn's MNI152 2009a symmetric T1
  template (1 mm) with its grey- and white-matter probability maps thresholded into a label
  mask (0 background, 1 grey matter, 2 white matter), read with nibabel (nilearn is not
  imported, which takes seconds).
* :func:`shepp_logan_2d`: scikit-image's Shepp-Logan phantom with its regions as labels and
  optional noise, a CT-like multi-label image.
* :func:`tile_image`: cut an image and its mask into square tiles (few-shot episodes of crops).

Images are returned as float32 numpy arrays scaled to [0, 1], masks as int64.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from medmeta.recipes import package_images

__all__ = [
    "nuclei_2d",
    "nuclei_3d",
    "mni152_volume",
    "mni152_slices",
    "shepp_logan_2d",
    "tile_image",
    "MNI152_LABELS",
]

MNI152_LABELS = ("background", "grey matter", "white matter")


def _scale01(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _nuclei(pair: tuple[np.ndarray, np.ndarray], binary: bool) -> tuple[np.ndarray, np.ndarray]:
    img, mask = pair
    mask = mask.astype(np.int64)
    return _scale01(img), (mask > 0).astype(np.int64) if binary else mask


def nuclei_2d(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """stardist's 2-D nuclei image ``(512, 512)`` in [0, 1] and its instance mask.

    ``binary=True`` returns the mask as 0 background / 1 nucleus instead of instance ids.
    """
    return _nuclei(package_images.fluorescence_nuclei(), binary)


def nuclei_3d(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """stardist's synthetic 3-D nuclei volume ``(31, 61, 57)`` in [0, 1] and its instance mask."""
    return _nuclei(package_images.nuclei_volume(), binary)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    shape = tuple((s // f) * f for s in a.shape)
    a = a[tuple(slice(0, s) for s in shape)].astype(np.float32)
    return a.reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f).mean(axis=(1, 3, 5))


def mni152_volume(downsample: int = 2, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """MNI152 T1 template in [0, 1], its tissue labels and the voxel spacing in mm.

    Probability maps (and the T1) are block-averaged by ``downsample`` (1: the native 1 mm
    grid, 197 x 233 x 189); a voxel is grey matter (1) where its grey-matter probability is at
    least ``threshold`` and not below the white-matter one, white matter (2) likewise, else 0.
    """
    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample: expected an int >= 1, got {downsample!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold}")
    volumes = package_images.mni152_volumes(spacing=True)
    arrays = {}
    for key in ("t1", "gm", "wm"):
        a = np.asarray(volumes[key], dtype=np.float32)
        arrays[key] = _block_mean(a, downsample) if downsample > 1 else a
    spacing = tuple(z * downsample for z in volumes["spacing"])
    gm, wm = arrays["gm"] / 255.0, arrays["wm"] / 255.0
    labels = np.zeros(gm.shape, dtype=np.int64)
    labels[(gm >= threshold) & (gm >= wm)] = 1
    labels[(wm >= threshold) & (wm > gm)] = 2
    return _scale01(arrays["t1"]), labels, spacing


def mni152_slices(
    axis: int = 2,
    downsample: int = 2,
    threshold: float = 0.5,
    min_foreground: float = 0.05,
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], np.ndarray]:
    """2-D slices of :func:`mni152_volume` along ``axis``.

    Keeps every ``step``-th slice whose labelled (grey or white matter) fraction is at least
    ``min_foreground``. Returns images ``(N, H, W)``, label masks ``(N, H, W)``, the in-plane
    spacing (mm) and the kept slice indices.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis: expected 0, 1 or 2, got {axis!r}")
    if step < 1:
        raise ValueError(f"step: expected >= 1, got {step}")
    vol, labels, spacing = mni152_volume(downsample, threshold)
    vol, labels = np.moveaxis(vol, axis, 0), np.moveaxis(labels, axis, 0)
    frac = (labels > 0).mean(axis=(1, 2))
    keep = np.nonzero(frac >= min_foreground)[0][::step]
    if keep.size == 0:
        raise ValueError(f"mni152_slices: no slice along axis {axis} has a foreground fraction >= {min_foreground}")
    in_plane = tuple(s for i, s in enumerate(spacing) if i != axis)
    return vol[keep], labels[keep], (in_plane[0], in_plane[1]), keep


def shepp_logan_2d(size: int = 128, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's Shepp-Logan phantom resized to ``size`` with its regions as labels.

    Labels (by phantom intensity): 0 outside, 1 skull (1.0), 2 brain (0.2), 3 dark ellipses
    (0.0 inside the head), 4 grey ellipses (0.1 and 0.3 tissue), 5 bright ellipses (0.4).
    ``noise`` adds Gaussian noise of that standard deviation (seeded) to the image.
    """
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    ph = shepp_logan_phantom().astype(np.float32)
    if size != ph.shape[0]:
        ph = resize(ph, (size, size), order=0, anti_aliasing=False, preserve_range=True).astype(np.float32)
    from scipy import ndimage

    v = np.round(ph, 1)
    head = ndimage.binary_fill_holes(v > 0)
    labels = np.zeros(ph.shape, dtype=np.int64)
    labels[v == 1.0] = 1
    labels[v == 0.2] = 2
    labels[(v == 0.0) & head] = 3
    labels[(v == 0.1) | (v == 0.3)] = 4
    labels[v == 0.4] = 5
    img = ph
    if noise > 0:
        img = img + np.random.default_rng(seed).normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), labels


def tile_image(
    image: np.ndarray, mask: np.ndarray, size: int, stride: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 2-D image and its mask into ``size`` x ``size`` tiles (row-major, stride ``stride``).

    Returns ``(N, size, size)`` image and mask tiles; the right and bottom rests are dropped.
    """
    if image.ndim != 2 or image.shape != mask.shape:
        raise ValueError(
            f"tile_image: expected a 2-D image and a mask of the same shape, got {image.shape} and {mask.shape}"
        )
    stride = size if stride is None else stride
    if size < 1 or stride < 1 or size > min(image.shape):
        raise ValueError(f"tile_image: size {size} / stride {stride} do not fit an image of shape {image.shape}")
    ys = range(0, image.shape[0] - size + 1, stride)
    xs = range(0, image.shape[1] - size + 1, stride)
    imgs = np.stack([image[y : y + size, x : x + size] for y in ys for x in xs])
    masks = np.stack([mask[y : y + size, x : x + size] for y in ys for x in xs])
    return imgs, masks
