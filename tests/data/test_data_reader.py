"""MedIMetaTaskSource on hand-written datasets: items, labels per kind, splits, channel conversion,
TIFF fallback, DataLoader workers (fork and spawn), pickling. Expected values are computed from
the pixel formulas of data_fixtures, or by a per-item reader written from the format spec."""
from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import (
    HAND_RGB_LABELS,
    HAND_RGB_ORIGINAL,
    HAND_RGB_SPLITS,
    ORDINAL_KEYS,
    gray_pixels,
    reference_item,
    rgb_pixels,
)
from torch.utils.data import DataLoader

from medmeta.data import MedIMetaTaskSource, MetaDataset
from medmeta.episodes.labels import encode_labels, labels_to_tensor
from medmeta.tasks import TaskTarget


def _norm(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0 - 0.5) / 0.5


def test_items_equal_the_pixel_formula_and_labels_are_the_stored_keys(hand_root):
    src = MedIMetaTaskSource(hand_root, "hand_rgb", "organ", split="train")
    assert src.image_indices.tolist() == sorted(HAND_RGB_SPLITS["train"])  # file order is not kept: sorted
    expected = rgb_pixels(12, 6, 5)
    for pos, index in enumerate(src.image_indices):
        image, label = src[pos]
        assert image.shape == (3, 6, 5) and image.dtype == torch.float32
        np.testing.assert_array_equal(image.numpy(), _norm(expected[index]).transpose(2, 0, 1))
        assert label.dtype == torch.int64 and label.shape == () and int(label) == index % 3
    # one hand-computed value: image 3, y=2, x=4, green: (17*3 + 5*2 + 3*4 + 50) % 256 = 123
    assert src[src.positions_of([3])[0]][0][1, 2, 4].item() == pytest.approx((123 / 255 - 0.5) / 0.5)


def test_label_shapes_and_values_per_task_kind(hand_root):
    meta = MetaDataset(hand_root)
    n_train = len(HAND_RGB_SPLITS["train"])
    train = sorted(HAND_RGB_SPLITS["train"])
    # binary: stored (N,), item label shape (1,) as in the official loader
    binary = meta.source("hand_rgb", "malignant", split="train")
    assert binary.labels.shape == (n_train,)
    assert binary[0][1].shape == (1,) and binary[0][1].tolist() == [HAND_RGB_LABELS["malignant"][train[0]]]
    # multi-label: (K,) 0/1 per item
    ml = meta.source("hand_rgb", "findings", split="train")
    assert ml.labels.shape == (n_train, 3)
    assert ml[2][1].tolist() == [(train[2] >> b) & 1 for b in range(3)]
    # ordinal: raw keys with gaps
    ordinal = meta.source("hand_rgb", "Field definition", split="train")
    assert ordinal.description.label_keys == tuple(ORDINAL_KEYS)
    assert ordinal.labels.tolist() == [ORDINAL_KEYS[i % 5] for i in train]

    # the episode encoding every learner sees (medmeta.tasks)
    d = binary.description
    enc = labels_to_tensor(encode_labels(binary.labels, d, d), d.task_target)
    assert enc.dtype == torch.float32 and enc.shape == (n_train, 1)
    assert enc[:, 0].tolist() == [float(HAND_RGB_LABELS["malignant"][i]) for i in train]
    d = ml.description
    enc = labels_to_tensor(encode_labels(ml.labels, d, d), d.task_target)
    assert enc.dtype == torch.float32 and enc.shape == (n_train, 3)
    d = ordinal.description
    enc = labels_to_tensor(encode_labels(ordinal.labels, d, d), d.task_target)
    assert enc.dtype == torch.int64 and enc.shape == (n_train,)
    # keys 1, 4, 6, 8, 10 map to positions 0..4 in key order
    assert enc.tolist() == [ORDINAL_KEYS.index(k) for k in ordinal.labels]
    sub = d.subset([1, 3])  # an episode with keys 4 and 8 only
    keep = np.isin(ordinal.labels, [4, 8])
    assert encode_labels(ordinal.labels[keep], sub, d).tolist() == [0 if k == 4 else 1 for k in ordinal.labels[keep]]
    mc = meta.source("hand_rgb", "organ", split="train")
    enc = labels_to_tensor(encode_labels(mc.labels, mc.description, mc.description), TaskTarget.MULTICLASS_CLASSIFICATION)
    assert enc.dtype == torch.int64 and enc.tolist() == [i % 3 for i in train]


def test_splits_lists_original_splits_and_empty_splits(hand_root):
    meta = MetaDataset(hand_root)
    for name, idx in HAND_RGB_SPLITS.items():
        assert meta.source("hand_rgb", "organ", split=name).image_indices.tolist() == sorted(idx)
    both = meta.source("hand_rgb", "organ", split=["test", "val"])
    assert both.image_indices.tolist() == [8, 9, 10, 11]
    assert meta.source("hand_rgb", "organ", split=None).image_indices.tolist() == list(range(12))
    orig = meta.source("hand_rgb", "organ", split="train", original_splits=True)
    assert orig.image_indices.tolist() == HAND_RGB_ORIGINAL["train"]
    empty = meta.source("hand_rgb", "organ", split="val", original_splits=True)  # counted 0, no file
    assert len(empty) == 0 and empty.read_images([]).shape[0] == 0
    with pytest.raises(KeyError, match="'train'"):
        meta.source("hand_rgb", "organ", split="training")


def test_channel_conversion_gray_to_rgb_rgb_to_gray_and_resize(hand_root):
    meta = MetaDataset(hand_root)
    # stored gray, input_size 3 channels: the gray value repeated on R, G, B
    rgb = meta.source("hand_gray_as_rgb", "grade", split="train")
    image = rgb[1][0]
    assert image.shape == (3, 4, 4)
    expected = _norm(gray_pixels(6, 4, 4)[1])
    for c in range(3):
        np.testing.assert_array_equal(image[c].numpy(), expected)
    # stored RGB 8x10, input_size [1, 4, 5]: PIL's L formula, then bilinear resize
    gray = meta.source("hand_rgb_as_gray", "kind", split="train")
    assert gray[0][0].shape == (1, 4, 5)
    full = meta.source("hand_rgb_as_gray", "kind", split="train", image_size=(8, 10))  # no resize
    assert full[0][0][0, 0, 0].item() == pytest.approx((76 / 255 - 0.5) / 0.5)  # pure red -> L 76
    stored = rgb_pixels(6, 8, 10)[1].astype(np.int64)
    luma = (19595 * stored[..., 0] + 38470 * stored[..., 1] + 7471 * stored[..., 2] + 0x8000) >> 16
    np.testing.assert_array_equal(full[1][0][0].numpy(), _norm(luma))
    for pos in range(len(gray)):
        np.testing.assert_allclose(gray[pos][0].numpy(), reference_item(gray.dataset_dir, int(gray.image_indices[pos]), 1, (4, 5)),
                                   atol=1e-6)
    # channels override: the MedIMeta paper's 3-channel input on a gray dataset, and gray from RGB
    forced = meta.source("hand_gray", "grade", split="train", channels=3)
    assert forced[0][0].shape == (3, 7, 7) and torch.equal(forced[0][0][0], forced[0][0][2])
    forced_gray = meta.source("hand_rgb", "organ", split="train", channels=1)
    np.testing.assert_allclose(forced_gray[0][0].numpy(), reference_item(forced_gray.dataset_dir, 0, 1, (6, 5)), atol=1e-6)


def test_tiff_fallback_equals_hdf5(hand_root):
    for dataset_id, task in (("hand_rgb", "organ"), ("hand_gray", "grade"), ("hand_gray_as_rgb", "grade"),
                             ("hand_rgb_as_gray", "kind")):
        h5 = MedIMetaTaskSource(hand_root, dataset_id, task, split=None)
        tif = MedIMetaTaskSource(hand_root, dataset_id, task, split=None, image_format="tiff")
        positions = list(range(len(h5)))[::-1]
        assert torch.equal(h5.read_images(positions), tif.read_images(positions)), dataset_id
        np.testing.assert_allclose(tif[1][0].numpy(), reference_item(tif.dataset_dir, 1, h5.num_channels, h5.image_size, tiff=True),
                                   atol=1e-6)


@pytest.mark.parametrize("memory_map", [True, False])
@pytest.mark.parametrize("positions", [[11, 0, 5, 5, 3, 11, 7], [9, 2, 4, 0], [1, 2, 3, 4], [6, 6]])
def test_batch_read_matches_per_item_reads_in_any_order(hand_root, memory_map, positions):
    src = MedIMetaTaskSource(hand_root, "hand_rgb", "findings", split=None, memory_map=memory_map)
    batch = src.read_images(positions)
    assert isinstance(src._images(), np.ndarray) == memory_map  # which read path ran
    for row, pos in zip(batch, positions):
        np.testing.assert_allclose(row.numpy(), reference_item(src.dataset_dir, pos, 3, (6, 5)), atol=1e-6)
    gray = MedIMetaTaskSource(hand_root, "hand_rgb_as_gray", "kind", split=None, memory_map=memory_map)
    small = [p % 6 for p in positions]  # stored 8x10, output 4x5: the per-image resize path
    for row, pos in zip(gray.read_images(small), small):
        np.testing.assert_allclose(row.numpy(), reference_item(gray.dataset_dir, pos, 1, (4, 5)), atol=1e-6)


def test_index_errors_negative_positions_and_transforms(hand_root):
    src = MedIMetaTaskSource(hand_root, "hand_rgb", "findings", split=None)
    positions = [11, 0, 5, 5, 3, 11, 7]
    batch = src.read_images(positions)
    with pytest.raises(IndexError, match="out of range"):
        src.read_images([12])
    assert torch.equal(src[-1][0], batch[0]) and torch.equal(src[-1][1], src[11][1])
    # transforms run on the normalised batch tensor
    flipped = MedIMetaTaskSource(hand_root, "hand_rgb", "findings", split=None, transform=lambda x: x.flip(-1))
    assert torch.equal(flipped.read_images(positions), batch.flip(-1))


def _loader_batches(src, context, workers):
    loader = DataLoader(src, batch_size=4, num_workers=workers, multiprocessing_context=context, shuffle=False)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_fork_and_spawn_read_the_same_items(hand_root, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.fail(f"start method {method} unavailable on this platform")
    src = MedIMetaTaskSource(hand_root, "hand_rgb", "findings", split=None)
    src.read_images([0])  # the parent holds an open handle (memory map) before the workers start
    assert src._h5images is not None
    # spawn starts a fresh interpreter per worker (seconds each): one worker shows the point
    batches = _loader_batches(src, multiprocessing.get_context(method), 2 if method == "fork" else 1)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(images, src.read_images(range(len(src))))
    assert torch.equal(labels, torch.as_tensor(HAND_RGB_LABELS["findings"]))


def test_pickling_drops_the_hdf5_handle_and_reopens(hand_root):
    src = MedIMetaTaskSource(hand_root, "hand_gray", "grade", split="test")
    before = src.read_images([0, 1])
    state = src.__getstate__()
    assert state["_h5file"] is None and state["_h5images"] is None and src._h5images is not None
    copy = pickle.loads(pickle.dumps(src))
    assert torch.equal(copy.read_images([0, 1]), before)
    meta = MetaDataset(hand_root)
    meta.source("hand_gray", "grade", split="test").read_images([0])
    assert pickle.loads(pickle.dumps(meta)).source("hand_gray", "grade", split="test")[0][1].item() == 0
    src.close()
    assert torch.equal(src.read_images([0, 1]), before)  # reopens lazily


def test_description_and_identifiers_follow_the_official_loader(hand_root):
    src = MedIMetaTaskSource(hand_root, "hand_rgb_as_gray", "kind")
    d = src.description
    assert d.task_identifier == "Hand RGB as Gray: kind" and d.domain_identifier == "Domain C"
    assert d.label_keys == (3, 7) and d.classes == ("x", "y")
    assert src.dataset_dir.name == "rgb_to_gray_folder"  # found by the id inside info.yaml


def test_chunked_compressed_hdf5_reads_through_h5py_with_the_same_values(hand_root, tmp_path):
    import shutil

    import h5py

    folder = tmp_path / "hand_gray"
    shutil.copytree(hand_root / "hand_gray", folder)
    with h5py.File(folder / "images.hdf5", "w") as f:
        f.create_dataset("images", data=gray_pixels(10, 7, 7), chunks=(2, 7, 7), compression="gzip")
    src = MedIMetaTaskSource(folder, None, "grade", split=None)
    ref = MedIMetaTaskSource(hand_root, "hand_gray", "grade", split=None)
    positions = [7, 1, 1, 4, 9]
    assert torch.equal(src.read_images(positions), ref.read_images(positions))
    assert not isinstance(src._images(), np.ndarray) and isinstance(ref._images(), np.ndarray)
