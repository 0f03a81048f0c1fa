"""Every bad-input case of issue 2 gets an error naming the file, the field and what was expected."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import yaml

from medmeta.data import (
    DataFormatError,
    MedIMetaTaskSource,
    MetaDataset,
    MissingDataError,
    UnknownNameError,
)


@pytest.fixture()
def rgb_copy(hand_root, tmp_path):
    """A writable copy of the hand-written RGB dataset (root, dataset folder)."""
    root = tmp_path / "root"
    shutil.copytree(hand_root / "hand_rgb", root / "hand_rgb")
    return root, root / "hand_rgb"


def _edit_info(folder, **changes):
    info = yaml.safe_load((folder / "info.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            info.pop(key)
        else:
            info[key] = value
    (folder / "info.yaml").write_text(yaml.safe_dump(info, sort_keys=False))


def test_missing_info_yaml_and_missing_field(rgb_copy):
    root, folder = rgb_copy
    _edit_info(folder, domain=None)
    with pytest.raises(DataFormatError, match=r"hand_rgb/info\.yaml: missing required field\(s\) \['domain'\]"):
        MetaDataset(root)
    (folder / "info.yaml").unlink()
    with pytest.raises(MissingDataError, match=r"hand_rgb/info\.yaml: info\.yaml not found"):
        MedIMetaTaskSource(folder, None, "organ")
    with pytest.raises(MissingDataError, match=r"hand_rgb/info\.yaml: info\.yaml not found"):
        MetaDataset(root)
    shutil.rmtree(folder)
    (root / "notes").mkdir()
    with pytest.raises(MissingDataError, match="no datasets found"):
        MetaDataset(root)
    with pytest.raises(MissingDataError, match="data root not found"):
        MetaDataset(root / "nowhere")


def test_bad_fields_name_the_field(rgb_copy):
    root, folder = rgb_copy
    info = yaml.safe_load((folder / "info.yaml").read_text())
    bad_target = [dict(t) for t in info["tasks"]]
    bad_target[1]["task_target"] = "BINARY"
    _edit_info(folder, tasks=bad_target)
    with pytest.raises(DataFormatError, match=r"info\.yaml: field 'tasks\[1\]\.task_target': unknown task target 'BINARY'"):
        MetaDataset(root)
    _edit_info(folder, tasks=info["tasks"], splits_num_samples={"train": 8, "val": 2, "test": 3})
    with pytest.raises(DataFormatError, match=r"field 'splits_num_samples'.*sum to 13, expected total_num_samples = 12"):
        MetaDataset(root)
    _edit_info(folder, splits_num_samples=info["splits_num_samples"], input_size=[2, 6, 5])
    with pytest.raises(DataFormatError, match=r"field 'input_size': channels must be 1 or 3"):
        MetaDataset(root)
    _edit_info(folder, input_size=[3, 6, 5], total_num_samples="twelve")
    with pytest.raises(DataFormatError, match=r"field 'total_num_samples': expected an integer"):
        MetaDataset(root)


def test_label_file_length_values_shape_and_missing(rgb_copy):
    root, folder = rgb_copy
    labels = folder / "task_labels"
    np.save(labels / "organ.npy", np.arange(11) % 3)
    with pytest.raises(DataFormatError, match=r"task_labels/organ\.npy: holds 11 labels, expected one per image: "
                                              r"total_num_samples = 12"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    np.save(labels / "organ.npy", np.arange(12) % 4)
    with pytest.raises(DataFormatError, match=r"organ\.npy: values \[3\] are not label keys of task 'organ'"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    np.save(labels / "findings.npy", np.zeros((12, 2), dtype=np.int64))
    with pytest.raises(DataFormatError, match=r"findings\.npy: multi-label task 'findings' expects shape \(12, 3\)"):
        MedIMetaTaskSource(root, "hand_rgb", "findings")
    np.save(labels / "Field definition.npy", np.asarray([object()] * 12, dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"Field definition\.npy: not a readable \.npy label array"):
        MedIMetaTaskSource(root, "hand_rgb", "Field definition")  # pickled arrays are never loaded
    (labels / "malignant.npy").unlink()
    with pytest.raises(MissingDataError, match=r"task_labels/malignant\.npy: label file of task 'malignant' not found"):
        MedIMetaTaskSource(root, "hand_rgb", "malignant")


def test_split_naming_a_missing_image_and_inconsistent_split_files(rgb_copy):
    root, folder = rgb_copy
    (folder / "splits" / "test.txt").write_text("images/000010.tiff\nimages/000012.tiff")
    with pytest.raises(DataFormatError, match=r"splits/test\.txt: line 2: names image 'images/000012\.tiff' \(index 12\), "
                                              r"but the dataset has 12 images"):
        MedIMetaTaskSource(root, "hand_rgb", "organ", split="test")
    (folder / "splits" / "test.txt").write_text("images/000010.tiff\nnot an image")
    with pytest.raises(DataFormatError, match=r"test\.txt: line 2: expected an image path"):
        MedIMetaTaskSource(root, "hand_rgb", "organ", split="test")
    (folder / "splits" / "test.txt").write_text("images/000010.tiff")
    with pytest.raises(DataFormatError, match=r"test\.txt: lists 1 images, but info\.yaml splits_num_samples\['test'\] = 2"):
        MedIMetaTaskSource(root, "hand_rgb", "organ", split="test")
    (folder / "splits" / "test.txt").unlink()
    with pytest.raises(MissingDataError, match=r"splits/test\.txt: split file not found"):
        MedIMetaTaskSource(root, "hand_rgb", "organ", split="test")


def test_unknown_dataset_task_and_split_list_what_exists(hand_root):
    meta = MetaDataset(hand_root)
    with pytest.raises(UnknownNameError, match=r"dataset_id='hand_rbg'.*did you mean 'hand_rgb'.*'hand_gray'") as err:
        meta.source("hand_rbg", "organ")
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownNameError, match=r"has no task 'organs'; did you mean 'organ'.*'findings'"):
        meta.source("hand_rgb", "organs")
    with pytest.raises(UnknownNameError, match=r"split='tset'.*did you mean 'test'"):
        meta.source("hand_rgb", "organ", split="tset")
    with pytest.raises(UnknownNameError, match=r"dataset_ids: unknown dataset id 'nope'.*'hand_gray'"):
        MetaDataset(hand_root, dataset_ids=["hand_rgb", "nope"])
    with pytest.raises(UnknownNameError, match=r"domains: unknown domain 'Domain Z'.*'Domain A'"):
        meta.filter(domains="Domain Z")
    held = meta.held_out("hand_rgb")
    with pytest.raises(UnknownNameError, match=r"left out as an overlap of the held-out target"):
        held.source("hand_gray", "grade")
    with pytest.raises(TypeError, match="unexpected argument"):
        meta.source("hand_rgb", "organ", chanels=3)


def test_corrupt_missing_and_wrong_hdf5(rgb_copy):
    root, folder = rgb_copy
    h5 = folder / "images.hdf5"
    h5.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataFormatError, match=r"hand_rgb/images\.hdf5: cannot be read as HDF5 .*expected an HDF5 file "
                                              r"with a uint8 dataset 'images'"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    h5.unlink()
    with pytest.raises(MissingDataError, match=r"images\.hdf5: image file not found"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    # the TIFF fallback still works without the HDF5 file
    assert MedIMetaTaskSource(root, "hand_rgb", "organ", image_format="tiff").read_images([0]).shape == (1, 3, 6, 5)
    with h5py.File(h5, "w") as f:
        f.create_dataset("pixels", data=np.zeros((12, 6, 5, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"images\.hdf5: no dataset 'images' \(has \['pixels'\]\)"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    h5.unlink()
    with h5py.File(h5, "w") as f:
        f.create_dataset("images", data=np.zeros((12, 6, 5, 3), np.float32))
    with pytest.raises(DataFormatError, match=r"images\.hdf5: dataset 'images' has dtype float32, expected uint8"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")
    h5.unlink()
    with h5py.File(h5, "w") as f:
        f.create_dataset("images", data=np.zeros((11, 6, 5, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"holds 11 images, but info\.yaml total_num_samples = 12"):
        MedIMetaTaskSource(root, "hand_rgb", "organ")


def test_missing_and_corrupt_tiff(rgb_copy):
    root, folder = rgb_copy
    src = MedIMetaTaskSource(root, "hand_rgb", "organ", split=None, image_format="tiff")
    (folder / "images" / "000003.tiff").unlink()
    with pytest.raises(MissingDataError, match=r"images/000003\.tiff: TIFF image 3 not found"):
        src.read_images([3])
    (folder / "images" / "000004.tiff").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"images/000004\.tiff: cannot be read as a TIFF image"):
        src.read_images([4])


def test_duplicate_dataset_ids_are_an_error(hand_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(hand_root / "hand_gray", root / "hand_gray")
    shutil.copytree(hand_root / "hand_gray", root / "copy_of_gray")
    with pytest.raises(DataFormatError, match=r"field 'id': dataset id 'hand_gray' is also used by"):
        MetaDataset(root)
