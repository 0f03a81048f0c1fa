"""The bundled real segmentation images load offline, with consistent masks and spacing."""
from __future__ import annotations

import numpy as np
import pytest

from medmeta.adapters.segmentation import real_data


def test_nuclei_2d_and_3d_load_with_instance_masks():
    img, inst = real_data.nuclei_2d()
    assert img.shape == inst.shape == (512, 512) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0
    assert inst.max() > 100  # instance ids, one per nucleus
    _, binary = real_data.nuclei_2d(binary=True)
    np.testing.assert_array_equal(binary, inst > 0)
    # nuclei are brighter than the background
    assert img[binary == 1].mean() > 2 * img[binary == 0].mean()
    vol, vmask = real_data.nuclei_3d(binary=True)
    assert vol.shape == vmask.shape == (31, 61, 57) and set(np.unique(vmask)) == {0, 1}


def test_mni152_labels_and_spacing():
    vol, labels, spacing = real_data.mni152_volume(downsample=4)
    assert spacing == (4.0, 4.0, 4.0) and vol.shape == labels.shape == (49, 58, 47)
    counts = np.bincount(labels.ravel(), minlength=3)
    assert counts[1] > 0 and counts[2] > 0 and labels.max() == 2
    # T1 contrast: white matter is brighter than grey matter
    assert vol[labels == 2].mean() > vol[labels == 1].mean()
    imgs, masks, in_plane, idx = real_data.mni152_slices(axis=1, downsample=4, min_foreground=0.1, step=2)
    assert imgs.shape == masks.shape and imgs.shape[1:] == (49, 47) and in_plane == (4.0, 4.0)
    np.testing.assert_array_equal(masks, np.moveaxis(labels, 1, 0)[idx])
    assert ((masks > 0).mean(axis=(1, 2)) >= 0.1).all() and np.all(np.diff(idx) >= 2)
    with pytest.raises(ValueError, match="axis"):
        real_data.mni152_slices(axis=3)


def test_shepp_logan_regions_and_tiles():
    img, labels = real_data.shepp_logan_2d(64, noise=0.05, seed=1)
    assert img.shape == labels.shape == (64, 64) and set(np.unique(labels)) <= set(range(6))
    assert img[labels == 1].mean() > img[labels == 2].mean()  # the skull is the brightest region
    tiles, masks = real_data.tile_image(img, labels, 16, stride=8)
    assert tiles.shape == masks.shape == (49, 16, 16)
    np.testing.assert_array_equal(masks[8], labels[8:24, 8:24])  # row 1, column 1
    with pytest.raises(ValueError, match="same shape"):
        real_data.tile_image(img, labels[:10], 16)
