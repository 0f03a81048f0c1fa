"""medmeta.data: MedIMeta-format datasets: reading, writing, meta-dataset views, embedded data.

Heavy modules (h5py, PIL, pandas) are imported only when used.
"""
from medmeta.data.errors import DataFormatError, MissingDataError, UnknownNameError
from medmeta.data.catalog import medimeta_catalog
from medmeta.data.info import DatasetInfo, TaskInfo, read_info
from medmeta.data.medimeta import MedIMetaTaskSource
from medmeta.data.meta_dataset import MetaDataset, TaskEntry, discover_datasets
from medmeta.data.source import TaskSource
from medmeta.data.array_source import ArrayTaskSource
from medmeta.data.writer import write_dataset, write_dataset_from_folder

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
    "build_synthetic_meta_dataset",
    "discover_datasets",
    "embedded_path",
    "medimeta_catalog",
    "open_default",
    "read_info",
    "write_dataset",
    "write_dataset_from_folder",
]


def __getattr__(name: str):  # lazy: the generators and the embedded cache pull in more modules
    if name == "build_synthetic_meta_dataset":
        from medmeta.data.synthetic import build_synthetic_meta_dataset

        return build_synthetic_meta_dataset
    if name in ("open_default", "embedded_path"):
        from medmeta.data import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'medmeta.data' has no attribute {name!r}")
