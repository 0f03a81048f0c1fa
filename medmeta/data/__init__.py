"""medmeta.data: the MedIMeta format: reading, writing, meta-dataset views, the real catalogue.

Data sets built in this format by medmeta itself (the embedded defaults ``open_default``, the
synthetic and the real-image mini meta-datasets) are recipes: :mod:`medmeta.recipes`.
Names are imported lazily, so ``import medmeta.data`` loads neither torch nor h5py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from medmeta.errors import DataFormatError, MissingDataError, UnknownNameError
from medmeta.registry import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers (imported on first use at run time)
    from medmeta.data.array_source import ArrayTaskSource
    from medmeta.data.catalog import medimeta_catalog
    from medmeta.data.info import DatasetInfo, TaskInfo, read_info
    from medmeta.data.medimeta import MedIMetaTaskSource
    from medmeta.data.meta_dataset import MetaDataset, TaskEntry, discover_datasets
    from medmeta.data.source import TaskSource
    from medmeta.data.writer import write_dataset, write_dataset_from_folder

_EXPORTS = {
    "ArrayTaskSource": "array_source",
    "medimeta_catalog": "catalog",
    "DatasetInfo": "info",
    "TaskInfo": "info",
    "read_info": "info",
    "MedIMetaTaskSource": "medimeta",
    "MetaDataset": "meta_dataset",
    "TaskEntry": "meta_dataset",
    "discover_datasets": "meta_dataset",
    "TaskSource": "source",
    "write_dataset": "writer",
    "write_dataset_from_folder": "writer",
}

__all__ = [
    "ArrayTaskSource",
    "DataFormatError",
    "DatasetInfo",
    "MedIMetaTaskSource",
    "MetaDataset",
    "MissingDataError",
    "TaskEntry",
    "TaskInfo",
    "TaskSource",
    "UnknownNameError",
    "discover_datasets",
    "medimeta_catalog",
    "read_info",
    "write_dataset",
    "write_dataset_from_folder",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
