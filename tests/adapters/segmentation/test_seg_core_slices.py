"""2-D segmentation sets in the MedIMeta layout, slices of volumes, few-shot segmentation episodes."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from medmeta.adapters.segmentation.flare import pair_cases
from medmeta.adapters.segmentation.slices import (
    MASKS_DATASET,
    SegmentationEpisodeSampler,
    SegmentationTaskSource,
    VolumeSliceSource,
    prepare_slices,
    write_segmentation_set,
)
from medmeta.adapters.segmentation.synthetic_ct import FLARE_LABELS
from medmeta.adapters.segmentation.volumes import read_volume
from medmeta.data.info import read_info
from medmeta.errors import DataFormatError
from medmeta.tasks import TaskTarget


def _toy_set(n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if i % 3 != 2:  # every third image has no foreground
            masks[i, 2:8, 2:8] = 3  # label key 3
        if i % 2 == 0:
            masks[i, 10:14, 9:15] = 7  # label key 7
    return images, masks


def test_write_and_read_segmentation_set(tmp_path):
    images, masks = _toy_set()
    folder = write_segmentation_set(
        tmp_path / "toy", images, masks, labels={3: "organ", 7: "tumour"}, dataset_id="toy",
        splits={"train": range(0, 8), "test": range(8, 12)},
    )
    info = read_info(folder)
    assert info.tasks[0].task_target is TaskTarget.MULTILABEL_SEGMENTATION
    with h5py.File(folder / "images.hdf5", "r") as f:
        np.testing.assert_array_equal(f[MASKS_DATASET][:], masks)
    src = SegmentationTaskSource(tmp_path, "toy", split="test", normalize=None)
    assert len(src) == 4 and src.image_indices.tolist() == [8, 9, 10, 11]
    np.testing.assert_array_equal(src.labels, [[0, 1], [1, 0], [1, 1], [0, 0]])  # presence of (3, 7)
    m = src.read_masks([3, 0])
    assert m.dtype == torch.int64 and m.shape == (2, 16, 16)
    expected = np.zeros((12, 16, 16), np.int64)
    expected[masks == 3], expected[masks == 7] = 1, 2  # keys 3, 7 -> positions 1, 2
    np.testing.assert_array_equal(m.numpy(), expected[[11, 8]])
    np.testing.assert_allclose(src.read_images([1])[0, 0].numpy(), images[9] / 255.0, atol=1e-6)
    img, mask = src[2]
    assert img.shape == (1, 16, 16) and mask.shape == (16, 16)
    # a listed background key 0 is the background, not a class
    text = (folder / "info.yaml").read_text().replace("labels:\n", "labels:\n    0: background\n", 1)
    (folder / "info.yaml").write_text(text)
    with_bg = SegmentationTaskSource(folder)
    assert with_bg.description.classes == ("organ", "tumour") and with_bg.num_labels == 2
    small = SegmentationTaskSource(folder, image_size=(8, 8), channels=3)
    assert small.read_images([0]).shape == (1, 3, 8, 8) and small.read_masks([0]).shape == (1, 8, 8)


def test_bad_segmentation_sets_name_the_file(tmp_path):
    images, masks = _toy_set()
    folder = write_segmentation_set(tmp_path / "toy", images, masks, labels={3: "organ", 7: "tumour"}, dataset_id="toy")
    with h5py.File(folder / "images.hdf5", "a") as f:
        del f[MASKS_DATASET]
        f.create_dataset(MASKS_DATASET, data=masks[:, :8])
    with pytest.raises(DataFormatError, match=r"images.hdf5: dataset 'masks' is uint8 \(12, 8, 16\)"):
        SegmentationTaskSource(folder)
    with h5py.File(folder / "images.hdf5", "a") as f:
        del f[MASKS_DATASET]
    with pytest.raises(DataFormatError, match="images.hdf5: no dataset 'masks'"):
        SegmentationTaskSource(folder)
    bad = masks.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(DataFormatError, match=r"masks: mask values \[5\]"):
        write_segmentation_set(tmp_path / "bad", images, bad, labels={3: "organ", 7: "tumour"}, dataset_id="bad")


def test_slice_episodes_are_seeded_disjoint_and_remapped(tmp_path):
    images, masks = _toy_set()
    write_segmentation_set(tmp_path / "toy", images, masks, labels={3: "organ", 7: "tumour"}, dataset_id="toy")
    src = SegmentationTaskSource(tmp_path / "toy")
    sampler = SegmentationEpisodeSampler(src, n_support=2, n_query=3, label_keys=[7], seed=5)
    ep = sampler.episode(4)
    again = sampler.episode(4)
    np.testing.assert_array_equal(ep.support_indices, again.support_indices)
    assert set(ep.support_indices).isdisjoint(ep.query_indices)
    assert ep.description.task_target is TaskTarget.BINARY_SEGMENTATION and ep.description.classes == ("tumour",)
    # only key 7 is foreground, as label 1; every support slice contains it
    assert set(torch.unique(ep.support_labels).tolist()) == {0, 1}
    assert all(i % 2 == 0 for i in ep.support_indices)
    raw = masks[ep.query_indices]
    np.testing.assert_array_equal(ep.query_labels.numpy(), (raw == 7).astype(np.int64))
    assert ep.support_images.shape == (2, 1, 16, 16)
    both = SegmentationEpisodeSampler(src, n_support=2, n_query=3, seed=1)
    for i in range(10):  # two support slices always show both labels, query slices are others
        ep = both.episode(i)
        assert set(torch.unique(ep.support_labels).tolist()) == {0, 1, 2}
        assert len(ep.query_indices) == 3 and set(ep.support_indices).isdisjoint(ep.query_indices)
    with pytest.raises(ValueError, match="label_keys"):
        SegmentationEpisodeSampler(src, label_keys=[4])
    with pytest.raises(ValueError, match="fewer than n_support"):
        SegmentationEpisodeSampler(src, n_support=5, n_query=5, label_keys=[7])
    with pytest.raises(ValueError, match="unit='volume'"):
        SegmentationEpisodeSampler(src, unit="volume")


def test_volume_slices_and_volume_episodes(synthetic_ct_dir):
    pairs = pair_cases(synthetic_ct_dir / "images", synthetic_ct_dir / "labels")
    src = VolumeSliceSource.from_files(pairs, FLARE_LABELS, axis=2)
    assert src.num_volumes == 3 and len(src) == 3 * 16 and src.names == ["case_000", "case_001", "case_002"]
    assert src.spacings[0] == (1.5, 1.5, 3.0)
    assert src.images.shape[1:] == (1, 40, 40) and float(src.images.min()) >= -1 and float(src.images.max()) <= 1
    assert src.labels.shape == (48, 4) and src.labels[:, 0].any()
    sampler = SegmentationEpisodeSampler(src, n_support=1, n_query=2, unit="volume", seed=0)
    ep = sampler.episode(0)
    sv, qv = ep.info["support_volumes"], ep.info["query_volumes"]
    assert len(sv) == 1 and len(qv) == 2 and not set(sv) & set(qv)
    assert len(ep.query_indices) == 32  # whole query volumes, for 3-D scores
    assert np.all(src.volume_ids[ep.support_indices] == sv[0])
    assert src.labels[ep.support_indices].any(axis=1).all()  # support keeps annotated slices
    assert set(torch.unique(ep.query_labels).tolist()) <= {0, 1, 2, 3, 4}
    vol1 = read_volume(pairs[1][0]).data
    expected = (np.clip((vol1.astype(np.float32) + 160) / 400, 0, 1) - 0.5) / 0.5  # window (40, 400), official norm
    np.testing.assert_allclose(prepare_slices(vol1, 2), np.moveaxis(expected, 2, 0), atol=1e-6)
    np.testing.assert_allclose(src.read_images(src.volume_positions(1))[:, 0].numpy(), np.moveaxis(expected, 2, 0),
                               atol=1e-6)
    resized = VolumeSliceSource.from_files(pairs[:1], FLARE_LABELS, axis=0, size=(24, 24))
    assert resized.images.shape == (40, 1, 24, 24) and resized.masks.shape == (40, 24, 24)
