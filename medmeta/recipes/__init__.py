"""medmeta.recipes: data sets built offline from seeds and from files that installed packages ship.

The MedIMeta format itself (reader, writer, :class:`~medmeta.data.MetaDataset`) lives in
:mod:`medmeta.data`; this package holds the recipes that write data in it:

* :mod:`.embedded`: the embedded defaults, built on first use and cached:
  ``open_default("real")`` / ``open_default("synthetic")``;
* :mod:`.synthetic`: the seeded synthetic meta-dataset (:func:`build_synthetic_meta_dataset`);
* :mod:`.real_mini`: the real-image mini meta-dataset (:func:`build_real_mini_meta_dataset`);
* :mod:`.package_files`: the one locator for files that installed packages ship
  (:class:`PackageFile`, :func:`package_file`, :class:`PackageFileError`), every such file named once;
* :mod:`.package_images`: readers of those images (stardist nuclei, MNI152, DICOM, ...).

Names are imported lazily: ``import medmeta.recipes`` loads no image library.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from medmeta.registry import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers (imported on first use at run time)
    from medmeta.recipes.embedded import EMBEDDED, build_embedded, data_dir, embedded_path, open_default
    from medmeta.recipes.package_files import PackageFile, PackageFileError, package_file, package_version
    from medmeta.recipes.real_mini import REAL_MINI_DATASETS, build_real_mini_dataset, build_real_mini_meta_dataset
    from medmeta.recipes.synthetic import SYNTHETIC_DATASETS, build_synthetic_meta_dataset

_EXPORTS = {
    "open_default": "embedded",
    "embedded_path": "embedded",
    "build_embedded": "embedded",
    "data_dir": "embedded",
    "EMBEDDED": "embedded",
    "build_synthetic_meta_dataset": "synthetic",
    "SYNTHETIC_DATASETS": "synthetic",
    "build_real_mini_meta_dataset": "real_mini",
    "build_real_mini_dataset": "real_mini",
    "REAL_MINI_DATASETS": "real_mini",
    "PackageFile": "package_files",
    "PackageFileError": "package_files",
    "package_file": "package_files",
    "package_version": "package_files",
}

__all__ = [
    "EMBEDDED",
    "PackageFile",
    "PackageFileError",
    "REAL_MINI_DATASETS",
    "SYNTHETIC_DATASETS",
    "build_embedded",
    "build_real_mini_dataset",
    "build_real_mini_meta_dataset",
    "build_synthetic_meta_dataset",
    "data_dir",
    "embedded_path",
    "open_default",
    "package_file",
    "package_version",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
