"""NIfTI reading/writing with geometry, CT windowing, slicing and slice-wise / sliding-window inference."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medmeta.adapters.segmentation.synthetic_ct import FLARE_LABELS, make_synthetic_ct
from medmeta.adapters.segmentation.volumes import (
    case_name,
    from_slices,
    predict_volume,
    read_image_and_label,
    read_volume,
    sliding_window_2d,
    to_slices,
    window_ct,
    write_volume,
)
from medmeta.errors import DataFormatError, MissingDataError


def test_write_read_keeps_geometry(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[0.7, 0, 0, -10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    path = write_volume(tmp_path / "sub" / "x_0000.nii.gz", data, affine)
    vol = read_volume(path)
    assert vol.shape == (4, 5, 6) and vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert vol.name == "x" and case_name("train_012_0000.nii.gz") == "train_012" and case_name("a.nii") == "a"
    # a mask written with the image header keeps affine, spacing and qform/sform codes
    out = write_volume(tmp_path / "x.nii.gz", (data > 50).astype(np.int64), vol.affine, header=vol.header)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine)
    assert img.header.get_zooms() == pytest.approx((0.7, 0.8, 2.5))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_bad_inputs_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataFormatError, match="notes.txt.*not a NIfTI"):
        read_volume(text)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="fake.nii.gz.*cannot be read as NIfTI"):
        read_volume(fake)
    with pytest.raises(MissingDataError, match="absent.nii.gz"):
        read_volume(tmp_path / "absent.nii.gz")
    # missing spacing: pixdim zero in the stored header (nibabel would silently use 1 mm)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["pixdim"][1:4] = 0
    nib.save(img, str(tmp_path / "nospacing.nii.gz"))
    with pytest.raises(DataFormatError, match="nospacing.nii.gz.*no valid voxel spacing"):
        read_volume(tmp_path / "nospacing.nii.gz")
    # image and label of different shapes / spacings
    write_volume(tmp_path / "img.nii.gz", np.zeros((6, 6, 4), np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    write_volume(tmp_path / "lab.nii.gz", np.zeros((6, 6, 5), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0]))
    write_volume(tmp_path / "lab2.nii.gz", np.zeros((6, 6, 4), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(DataFormatError, match=r"lab.nii.gz: label shape \(6, 6, 5\) differs from image shape"):
        read_image_and_label(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    with pytest.raises(DataFormatError, match="lab2.nii.gz: label spacing"):
        read_image_and_label(tmp_path / "img.nii.gz", tmp_path / "lab2.nii.gz")
    with pytest.raises(ValueError, match="must end in .nii"):
        write_volume(tmp_path / "x.npy", np.zeros((2, 2, 2)), np.eye(4))


def test_window_and_slices():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    np.testing.assert_allclose(window_ct(hu, 40, 400), [0.0, 0.0, 0.5, 1.0, 1.0])
    vol = np.random.default_rng(0).normal(size=(5, 6, 7))
    for axis in (0, 1, 2, -1):
        s = to_slices(vol, axis)
        assert s.shape[0] == vol.shape[axis]
        np.testing.assert_array_equal(s[3], np.take(vol, 3, axis=axis))
        np.testing.assert_array_equal(from_slices(s, axis), vol)
    with pytest.raises(ValueError, match="axis"):
        to_slices(vol, 3)


def _pointwise(images):
    """A per-pixel predictor: logits of 3 classes from the intensity."""
    x = images[:, :1]
    return torch.cat([-(x - 0.0) ** 2, -(x - 0.5) ** 2, -(x - 1.0) ** 2], dim=1)


def test_slicewise_and_sliding_window_match_full_pass():
    rng = np.random.default_rng(1)
    slices = rng.uniform(size=(9, 20, 18)).astype(np.float32)
    expected = np.abs(slices[:, None] - np.array([0.0, 0.5, 1.0])[None, :, None, None]).argmin(1)
    full = predict_volume(_pointwise, slices, batch_size=None)
    np.testing.assert_array_equal(full, expected)
    np.testing.assert_array_equal(predict_volume(_pointwise, slices, batch_size=4), full)
    np.testing.assert_array_equal(predict_volume(_pointwise, slices, batch_size=2, window=8, overlap=0.5), full)
    images = torch.from_numpy(slices)[:, None]
    np.testing.assert_allclose(sliding_window_2d(_pointwise, images, (7, 11), 0.3), _pointwise(images), atol=1e-6)
    calls = []
    sliding_window_2d(lambda x: calls.append(tuple(x.shape[-2:])) or _pointwise(x), images, 10, 0.0)
    assert calls == [(10, 10)] * 4  # full-size windows, the last one in each row shifted inward
    calls.clear()
    sliding_window_2d(lambda x: calls.append(tuple(x.shape[-2:])) or _pointwise(x), images, 30, 0.0)
    assert calls == [(20, 18)]  # a window larger than the image is clipped to it
    with pytest.raises(ValueError, match="predictor: expected logits"):
        predict_volume(lambda x: x[:, 0], slices)


def test_synthetic_ct_is_seeded_and_labelled():
    a = make_synthetic_ct((40, 40, 16), (1.5, 1.5, 3.0), seed=3)
    b = make_synthetic_ct((40, 40, 16), (1.5, 1.5, 3.0), seed=3)
    c = make_synthetic_ct((40, 40, 16), (1.5, 1.5, 3.0), seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert set(np.unique(a.label)) == {0, *FLARE_LABELS}
    assert a.image.dtype == np.int16 and a.spacing == (1.5, 1.5, 3.0)
    np.testing.assert_allclose(np.diag(a.affine)[:3], a.spacing)
    means = {lab: a.image[a.label == lab].mean() for lab in FLARE_LABELS}
    assert means[2] > means[3] > means[1] > means[4] > a.image[a.label == 0].mean()  # kidney brightest
    assert (a.label == 1).sum() > (a.label == 3).sum() > (a.label == 4).sum()  # liver largest
