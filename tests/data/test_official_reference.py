"""Cross-check against the official loader, ``medimeta==0.0.6`` (Woerner et al.), as a reference
implementation: for the same dataset, task, split and index, our item must equal the official
item (pixels after channel conversion, resize and normalisation; label values, dtype and shape).

The official package imports without its heavy dependencies when installed with ``--no-deps``
together with ``torchcross==0.0.6``, ``torchopt==0.7.3``, ``optree`` and ``graphviz`` (lightning is
not needed to import it). Without it this module is skipped with that reason; the per-item
reader written from the format spec (``data_fixtures.reference_item``) is checked in
test_data_reader.py either way.
"""
from __future__ import annotations

import warnings

import pytest
import torch

medimeta = pytest.importorskip(
    "medimeta",
    reason="official loader not installed: pip install --no-deps medimeta==0.0.6 torchcross==0.0.6 torchopt==0.7.3 "
           "optree graphviz",
)

from medmeta.data import MedIMetaTaskSource, MetaDataset  # noqa: E402

CASES = [
    ("hand_rgb", "organ"), ("hand_rgb", "malignant"), ("hand_rgb", "Field definition"), ("hand_rgb", "findings"),
    ("hand_gray", "grade"), ("hand_gray_as_rgb", "grade"), ("hand_rgb_as_gray", "kind"),
]


def _official(root, dataset_id, task, use_hdf5=True, **split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # folder name != id (on purpose in one dataset)
        medimeta.MedIMeta._infos = None  # class-level cache of the official loader
        return medimeta.MedIMeta(str(root), dataset_id, task, use_hdf5=use_hdf5, **split)


def _assert_same_items(ours, theirs):
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        image, label = ours[i]
        ref_image, ref_label = theirs[i]
        assert image.shape == ref_image.shape and image.dtype == ref_image.dtype
        assert torch.equal(image, ref_image), (ours, i, (image - ref_image).abs().max())
        assert label.shape == ref_label.shape and label.dtype == ref_label.dtype, (ours, i)
        assert torch.equal(label, ref_label), (ours, i)


@pytest.mark.parametrize("dataset_id, task", CASES)
def test_items_equal_the_official_loader(hand_root, dataset_id, task):
    for split in ({"split": "train"}, {"split": ["val", "test"]}, {"original_split": "train"}):
        if dataset_id == "hand_gray_as_rgb" and split == {"split": ["val", "test"]}:
            split = {"split": "test"}  # this dataset has no val split (the official loader then raises)
        if dataset_id == "hand_rgb_as_gray" and "val" in str(split):
            split = {"split": "test"}
        ours = MedIMetaTaskSource(hand_root, dataset_id, task, **split)
        _assert_same_items(ours, _official(hand_root, dataset_id, task, **split))
    ours_tiff = MedIMetaTaskSource(hand_root, dataset_id, task, split="test", image_format="tiff")
    _assert_same_items(ours_tiff, _official(hand_root, dataset_id, task, use_hdf5=False, split="test"))


def test_writer_output_reads_the_same_in_the_official_loader(synthetic_root):
    meta = MetaDataset(synthetic_root, dataset_ids=["syn_xray", "syn_fundus"])
    for entry in meta.tasks:
        ours = meta.source(entry.dataset_id, entry.task_name, split="val")
        theirs = _official(synthetic_root, entry.dataset_id, entry.task_name, split="val")
        _assert_same_items(ours, theirs)
        assert theirs.task_description.task_identifier == ours.description.task_identifier
        assert theirs.task_description.domain_identifier == ours.description.domain_identifier
