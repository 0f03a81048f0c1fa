"""MedIMetaTaskSource.read_images(..., out=buffer): the same tensors, written into the caller's buffer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta.data.medimeta import MedIMetaTaskSource
from medmeta.data.writer import write_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 9, 7, 3), dtype=np.uint8)
    info = {"id": "buf", "name": "Buffer", "domain": "toy",
            "tasks": [{"task_name": "t", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "a", 1: "b"}}]}
    path = tmp_path_factory.mktemp("data")
    write_dataset(path, info, images, {"t": np.arange(12) % 2}, {"test": range(12)}, write_tiffs=True)
    return path


@pytest.mark.parametrize("options", [{}, {"memory_map": False}, {"image_format": "tiff"}, {"channels": 1},
                                     {"image_size": 5, "normalize": "imagenet"}])
def test_reading_into_a_buffer_gives_the_same_images(root, options):
    src = MedIMetaTaskSource(root, "buf", "t", **options)
    positions = [7, 2, 2, 11, 0]
    expected = src.read_images(positions)
    buffer = torch.full(expected.shape, float("nan"))
    got = src.read_images(positions, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, expected)
    again = src.read_images([1, 3, 5, 8, 9], out=buffer)  # reused: overwritten entirely
    assert torch.equal(again, src.read_images([1, 3, 5, 8, 9]))


def test_a_buffer_of_the_wrong_shape_or_dtype_is_refused(root):
    src = MedIMetaTaskSource(root, "buf", "t")
    with pytest.raises(ValueError, match=r"out: expected a contiguous CPU float32 tensor of shape \(2, 3, 9, 7\)"):
        src.read_images([0, 1], out=torch.empty(3, 3, 9, 7))
    with pytest.raises(ValueError, match="out: expected"):
        src.read_images([0, 1], out=torch.empty(2, 3, 9, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        src.read_images([0, 1], out=torch.empty(2, 3, 7, 9).transpose(2, 3))
