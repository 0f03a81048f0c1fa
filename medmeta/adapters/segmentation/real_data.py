"""Real segmentation images that installed packages ship: no downloads, no network.

* :func:`nuclei_2d`: stardist's fluorescence microscopy image of nuclei (2018 Kaggle Data
  Science Bowl; Caicedo et al., Nature Methods 2019) with its instance mask, 512 x 512;
  :func:`nuclei_3d` its small synthetic 3-D nuclei volume. The files are read with
  ``tifffile`` from the installed ``stardist`` package without importing it (stardist's
  ``__init__`` pulls in TensorFlow-era dependencies; ``pip install --no-deps stardist``
  suffices).
* :func:`mni152_volume` / :func:`mni152_slices`: nilearn's MNI152 2009a symmetric T1
  template (1 mm) with its grey- and white-matter probability maps thresholded into a label
  mask (0 background, 1 grey matter, 2 white matter), read with nibabel from the files nilearn
  bundles (nilearn is not imported, which takes seconds).
* :func:`shepp_logan_2d`: scikit-image's Shepp-Logan phantom with its regions as labels and
  optional noise, a CT-like multi-label image.
* :func:`tile_image`: cut an image and its mask into square tiles (few-shot episodes of crops).

Images are returned as float32 numpy arrays scaled to [0, 1], masks as int64.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "package_dir",
    "nuclei_2d",
    "nuclei_3d",
    "mni152_volume",
    "mni152_slices",
    "shepp_logan_2d",
    "tile_image",
    "MNI152_LABELS",
]

MNI152_LABELS = ("background", "grey matter", "white matter")

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def package_dir(name: str, pip_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"real data: package {name!r} is not installed; {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _scale01(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _read_tif(path: Path) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"real data: {path} is missing from the installed package")
    return tifffile.imread(path)


def nuclei_2d(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """stardist's 2-D nuclei image ``(512, 512)`` in [0, 1] and its instance mask.

    ``binary=True`` returns the mask as 0 background / 1 nucleus instead of instance ids.
    """
    d = package_dir("stardist", "pip install --no-deps stardist") / "data" / "images"
    img, mask = _read_tif(d / "img2d.tif"), _read_tif(d / "mask2d.tif")
    mask = mask.astype(np.int64)
    return _scale01(img), (mask > 0).astype(np.int64) if binary else mask


def nuclei_3d(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """stardist's synthetic 3-D nuclei volume ``(31, 61, 57)`` in [0, 1] and its instance mask."""
    d = package_dir("stardist", "pip install --no-deps stardist") / "data" / "images"
    img, mask = _read_tif(d / "img3d.tif"), _read_tif(d / "mask3d.tif")
    mask = mask.astype(np.int64)
    return _scale01(img), (mask > 0).astype(np.int64) if binary else mask


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
    import nibabel as nib

    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample: expected an int >= 1, got {downsample!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold}")
    d = package_dir("nilearn", "pip install nilearn") / "datasets" / "data"
    arrays, spacing = {}, None
    for key, name in _MNI_FILES.items():
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"real data: {path} is missing from the installed nilearn")
        img = nib.load(str(path))
        a = np.asarray(img.dataobj, dtype=np.float32)
        arrays[key] = _block_mean(a, downsample) if downsample > 1 else a
        spacing = tuple(float(z) * downsample for z in img.header.get_zooms()[:3])
    gm, wm = arrays["gm"] / 255.0, arrays["wm"] / 255.0
    labels = np.zeros(gm.shape, dtype=np.int64)
    labels[(gm >= threshold) & (gm >= wm)] = 1
    labels[(wm >= threshold) & (wm > gm)] = 2
    assert spacing is not None
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
