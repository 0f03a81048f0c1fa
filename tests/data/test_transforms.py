"""One image pipeline: medmeta.data.transforms against PIL, and the same grey pixels on every source."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medmeta.adapters.segmentation.slices import SegmentationTaskSource, write_segmentation_set
from medmeta.data import MedIMetaTaskSource, write_dataset
from medmeta.data.array_source import ArrayTaskSource
from medmeta.data.transforms import (
    NORMALIZATIONS,
    ImageTransform,
    gray_to_rgb,
    normalization_stats,
    read_image_file,
    resize_uint8,
    rgb_to_gray,
    uint8_to_float,
)
from medmeta.errors import DataFormatError, MissingDataError
from medmeta.evaluation.challenge import load_image_set
from medmeta.tasks import TaskDescription

H, W = 9, 11


def _rgb_images(n: int = 4, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    images[0, 0, 0] = (255, 0, 0)  # pure red: PIL L 76, the float formula 0.299 * 255 = 76.245
    images[0, 0, 1] = (0, 0, 255)  # pure blue: PIL L 29 (7471 * 255 / 65536 = 29.07)
    images[0, 0, 2] = (1, 1, 1)  # grey stays grey
    return images


def _pil_gray(image: np.ndarray, size: "tuple[int, int] | None" = None) -> np.ndarray:
    """The known answer: PIL's convert("L") (then PIL bilinear resize, as torchvision does)."""
    pil = Image.fromarray(image).convert("L")
    if size is not None:
        pil = pil.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def _official(gray: np.ndarray) -> torch.Tensor:
    """uint8 grey (N, H, W) -> the official loader's float32 values (ToTensor, Normalize(0.5, 0.5))."""
    return torch.from_numpy(gray).float().div(255).sub(0.5).div(0.5)[:, None]


# -- transform functions against PIL -----------------------------------------------------------
def test_rgb_to_gray_equals_pil_convert_l_on_random_images():
    rng = np.random.default_rng(1)
    for shape in ((17, 23, 3), (1, 256 * 64, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(rgb_to_gray(image), np.asarray(Image.fromarray(image).convert("L")))
    assert rgb_to_gray(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)).tolist() == [76, 150, 29]
    batch = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)  # a batch converts like its images
    np.testing.assert_array_equal(rgb_to_gray(batch), np.stack([rgb_to_gray(b) for b in batch]))


def test_gray_to_rgb_equals_pil_convert_rgb():
    gray = np.random.default_rng(2).integers(0, 256, (6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(gray_to_rgb(gray), np.asarray(Image.fromarray(gray).convert("RGB")))


@pytest.mark.parametrize("shape, size", [((20, 30), (7, 9)), ((20, 30, 3), (31, 12)), ((8, 8, 3), (8, 8))])
def test_resize_uint8_equals_torchvision_resize_on_pil(shape, size):
    from torchvision import transforms

    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    expected = np.asarray(transforms.Resize(size)(Image.fromarray(image)))
    np.testing.assert_array_equal(resize_uint8(image, size), expected)


def test_uint8_to_float_equals_torchvision_to_tensor_and_normalize():
    from torchvision import transforms

    image = np.random.default_rng(4).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    for name in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[name]
        expected = transforms.Normalize(mean, std)(transforms.ToTensor()(Image.fromarray(image)))
        got = uint8_to_float(torch.from_numpy(image).permute(2, 0, 1)[None], name)[0]
        assert torch.equal(got, expected), name
    assert normalization_stats("imagenet", 1) == ((0.485,), (0.229,))
    assert normalization_stats("official", 3) == ((0.5,) * 3, (0.5,) * 3)


def test_image_transform_batches_equal_the_per_image_official_path():
    from torchvision import transforms

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (70, 12, 10, 3), dtype=np.uint8)
    for channels, size, normalize in ((1, None, "official"), (3, (5, 6), "imagenet"), (1, (16, 16), None)):
        tf = ImageTransform(channels, size, normalize)
        steps: list = [transforms.Resize(size)] if size is not None else []
        steps.append(transforms.ToTensor())
        if normalize is not None:
            mean, std = normalization_stats(normalize, channels)
            steps.append(transforms.Normalize(mean, std))
        official = transforms.Compose(steps)
        mode = "L" if channels == 1 else "RGB"
        expected = torch.stack([official(Image.fromarray(img).convert(mode)) for img in rgb])
        assert torch.equal(tf(rgb), expected)
        # rows fetched in small chunks give the same batch (the memory-map path)
        assert torch.equal(tf.rows(lambda sel: rgb[sel], len(rgb), rgb.shape[1:]), expected)
    # grey stored, RGB wanted: the plane repeated; mixed grey and RGB single images
    gray = rgb_to_gray(rgb[:3])
    out = ImageTransform(3)(gray)
    assert out.shape == (3, 3, 12, 10) and torch.equal(out[:, 0], out[:, 2])
    mixed = ImageTransform(3, (12, 10)).images([gray[0], rgb[1]])
    assert torch.equal(mixed[0], out[0]) and torch.equal(mixed[1], ImageTransform(3)(rgb[1:2])[0])


def test_image_transform_is_a_hashable_checked_description():
    assert ImageTransform(1, 8, "official") == ImageTransform(1, (8, 8), "official")
    assert len({ImageTransform(1, 8), ImageTransform(1, (8, 8)), ImageTransform(3, 8)}) == 2
    with pytest.raises(ValueError, match="channels: expected None, 1 or 3, got 2"):
        ImageTransform(2)
    with pytest.raises(ValueError, match="normalize: expected None or one of"):
        ImageTransform(1, normalize="mean")
    with pytest.raises(ValueError, match="image_size: expected positive sizes"):
        ImageTransform(1, (0, 4))


def test_read_image_file_decodes_other_modes_through_pil(tmp_path):
    rgba = np.random.default_rng(6).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "a.png", 1), _pil_gray(rgba[..., :3]))
    np.testing.assert_array_equal(read_image_file(tmp_path / "a.png", 3), rgba[..., :3])
    with pytest.raises(MissingDataError, match="support.csv: image file .*b.png not found"):
        read_image_file(tmp_path / "b.png", 1, "support.csv")
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="c.png cannot be read as an image"):
        read_image_file(tmp_path / "c.png", 1)


# -- the same RGB image on every source --------------------------------------------------------
def _sources(tmp_path, images: np.ndarray, size: "tuple[int, int] | None") -> dict[str, torch.Tensor]:
    """Grey, officially normalised images as each source reads them (``size``: resized)."""
    n = len(images)
    out = {}
    info = {"id": "rgb", "name": "RGB", "domain": "test",
            "tasks": [{"task_name": "t", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "a", 1: "b"}}]}
    write_dataset(tmp_path / "medimeta", info, images, {"t": np.arange(n) % 2}, {"train": range(n)}, write_tiffs=True)
    for image_format in ("hdf5", "tiff"):
        src = MedIMetaTaskSource(tmp_path / "medimeta", "rgb", "t", channels=1, image_format=image_format,
                                 image_size=size or (H, W))
        out[f"medimeta-{image_format}"] = src.read_images(list(range(n)))
    write_segmentation_set(tmp_path / "seg", images, np.zeros((n, H, W), np.uint8), {1: "organ"}, dataset_id="seg")
    out["segmentation"] = SegmentationTaskSource(tmp_path / "seg", channels=1, image_size=size).read_images(
        list(range(n)))
    folder = tmp_path / "png"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    out["challenge"], _, _ = load_image_set(folder, None, with_labels=False, channels=1,
                                            image_size=None if size is None else size[0], normalize="official")
    if size is None:
        d = TaskDescription("MULTICLASS_CLASSIFICATION", ("a", "b"), "rgb: t", "test")
        out["array"] = ArrayTaskSource(images, np.arange(n) % 2, d, channels=1).read_images(list(range(n)))
    return out


def test_the_same_rgb_image_gives_the_same_grey_pixels_on_every_source(tmp_path):
    images = _rgb_images()
    expected = _official(np.stack([_pil_gray(img) for img in images]))
    read = _sources(tmp_path, images, None)
    assert sorted(read) == ["array", "challenge", "medimeta-hdf5", "medimeta-tiff", "segmentation"]
    for name, got in read.items():
        assert got.shape == (len(images), 1, H, W), name
        assert torch.equal(got, expected), name
    # pure red is PIL's 76, not 0.299 * 255 (the segmentation reader's former float formula)
    assert read["segmentation"][0, 0, 0, 0].item() == pytest.approx((76 / 255 - 0.5) / 0.5, abs=1e-6)


def test_resized_sources_agree_with_pil(tmp_path):
    images = _rgb_images(seed=7)
    size = (6, 6)
    expected = _official(np.stack([_pil_gray(img, size) for img in images]))
    read = _sources(tmp_path, images, size)
    assert sorted(read) == ["challenge", "medimeta-hdf5", "medimeta-tiff", "segmentation"]
    for name, got in read.items():
        assert torch.equal(got, expected), name
