"""Slide readers: geometry, scale and pixels agree across backends, on a real SVS and on synthetic
pyramids of every layout; bad files give clear errors."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medmeta.adapters.slides.backends import backend_installed
from medmeta.adapters.slides.errors import (
    NotPyramidalError,
    SlideError,
    SlideFormatError,
    SlideOpenError,
    SlideTruncatedError,
)
from medmeta.adapters.slides.reader import open_slide, slide_fingerprint
from medmeta.adapters.slides.synthetic import pyramid_levels

LAYOUTS = ["pages", "subifd", "aperio"]
OPTIONAL = ["pyvips", "cucim"]


def _optional(backend: str) -> None:
    if not backend_installed(backend):
        pytest.skip(f"backend {backend!r} is optional and not installed here (pip install {backend})")


def _regions(w: int, h: int, ds: float) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Aligned, straddling, edge and out-of-bounds regions (level-0 locations, level sizes)."""
    lw, lh = int(w / ds), int(h / ds)
    d = int(round(ds))
    return [
        ((0, 0), (min(256, lw), min(256, lh))),
        ((200 * d, 130 * d), (300, 170)),  # straddles stored tiles
        (((lw - 50) * d, (lh - 40) * d), (100, 90)),  # runs past the right and bottom edges
        ((-30 * d, -20 * d), (64, 48)),  # starts outside the slide
    ]


# ---- synthetic pyramids ------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tifffile_reader_sees_every_level_with_scale(synthetic, layout):
    s = synthetic(layout, "jpeg")
    with open_slide(s.path, backend="tifffile") as r:
        assert r.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
        assert r.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert r.mpp == pytest.approx((0.5, 0.5))
        assert r.tile_size == ((256, 256),) * 4
        assert r.magnification == (20.0 if layout == "aperio" else None)
        assert r.best_level_for_downsample(3.9) == 1
        assert r.best_level_for_downsample(4.0) == 2
        assert r.best_level_for_downsample(100) == 3
        assert r.best_level_for_downsample(0.5) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lossless_reads_equal_the_written_pixels(synthetic, layout):
    s = synthetic(layout, "zlib")
    truth = pyramid_levels(s.image, 256)
    with open_slide(s.path) as r:
        assert r.backend == "tifffile"
        for level, expected in enumerate(truth):
            h, w = expected.shape[:2]
            np.testing.assert_array_equal(r.read_region((0, 0), level, (w, h)), expected)
        ds = 2
        got = r.read_region((300 * ds, 77 * ds), 1, (200, 300))
        np.testing.assert_array_equal(got, truth[1][77:377, 300:500])


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["openslide", *OPTIONAL])
def test_backends_agree_on_synthetic_pyramids(synthetic, layout, compression, backend):
    _optional(backend)
    s = synthetic(layout, compression)
    ref = open_slide(s.path, backend="tifffile")
    other = open_slide(s.path, backend=backend)
    sees_subifds = backend == "pyvips"
    expected_levels = 1 if (layout == "subifd" and not sees_subifds) else 4  # the sub-IFD trap
    assert other.level_count == expected_levels
    assert other.mpp == pytest.approx(ref.mpp)
    for level in range(other.level_count):
        assert other.level_dimensions[level] == ref.level_dimensions[level]
        for loc, size in _regions(2048, 2048, ref.level_downsamples[level]):
            a = ref.read_region(loc, level, size)
            b = other.read_region(loc, level, size)
            assert a.shape == b.shape == (size[1], size[0], 3)
            diff = np.abs(a.astype(int) - b.astype(int))
            if compression == "zlib":
                assert diff.max() == 0, (backend, layout, level, loc)
            else:  # different JPEG decoder builds may round differently
                assert diff.max() <= 2 and diff.mean() < 0.25, (backend, layout, level, loc, diff.max())


def test_aperio_thumbnail_page_is_not_a_level(synthetic):
    s = synthetic("aperio", "jpeg")
    with tifffile.TiffFile(s.path) as tif:
        assert not tif.pages[1].is_tiled and tif.pages[1].shape[:2] == (256, 256)  # the trap is there
    for backend in ("tifffile", "openslide"):
        with open_slide(s.path, backend=backend) as r:
            assert r.level_count == 4
            assert r.level_dimensions[1] == (1024, 1024)
            assert r.magnification == 20.0


def test_auto_backend_choice(synthetic, cmu_svs):
    assert open_slide(synthetic("subifd", "jpeg").path).backend == "tifffile"
    assert open_slide(cmu_svs).backend == "tifffile"
    assert open_slide(synthetic("pages", "jpeg").path, backend="openslide").backend == "openslide"


# ---- the real Aperio slide ---------------------------------------------------------------
def test_real_svs_geometry_and_scale(cmu_svs):
    with open_slide(cmu_svs) as r:
        assert r.dimensions == (2220, 2967)
        assert r.level_count == 1
        assert r.mpp == pytest.approx((0.499, 0.499))
        assert r.magnification == 20.0
        assert r.tile_size == ((240, 240),)
        assert r.vendor == "aperio"


@pytest.mark.parametrize("backend", ["openslide", *OPTIONAL])
def test_real_svs_pixels_agree_across_backends(cmu_svs, backend):
    _optional(backend)
    ref = open_slide(cmu_svs, backend="tifffile")
    other = open_slide(cmu_svs, backend=backend)
    assert other.dimensions == ref.dimensions
    assert other.mpp == pytest.approx(ref.mpp, rel=1e-3)
    for loc, size in [((0, 0), (240, 240)), ((1000, 1500), (333, 271)), ((2100, 2900), (200, 200)), ((-10, 5), (40, 40))]:
        a, b = ref.read_region(loc, 0, size), other.read_region(loc, 0, size)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.25, (backend, loc, diff.max())
    # Tissue is there: the real slide is not blank.
    assert ref.read_region((1000, 1500), 0, (333, 271)).std() > 10


def test_real_svs_thumbnail_and_fingerprint(cmu_svs, tmp_path):
    r = open_slide(cmu_svs)
    thumb = r.get_thumbnail(256)
    assert thumb.shape == (256, round(2220 * 256 / 2967), 3)
    full = Image.fromarray(r.read_region((0, 0), 0, r.dimensions)).resize((thumb.shape[1], thumb.shape[0]), Image.BOX)
    assert np.abs(np.asarray(full).astype(int) - thumb.astype(int)).mean() < 6
    copy = tmp_path / "renamed.svs"
    shutil.copy(cmu_svs, copy)
    assert slide_fingerprint(copy) == r.fingerprint  # name-independent
    with open(copy, "r+b") as fh:  # a change in the header changes it
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert slide_fingerprint(copy) != r.fingerprint


def test_thumbnail_strip_path_matches_whole_level_path(synthetic, monkeypatch):
    s = synthetic("pages", "zlib")
    r = open_slide(s.path)
    whole = r.get_thumbnail((100, 80))
    assert whole.shape == (80, 80, 3)
    monkeypatch.setattr(type(r), "thumbnail_whole_level_pixels", 1000)  # force reading in strips
    strips = r.get_thumbnail((100, 80))
    assert strips.shape == whole.shape
    assert np.abs(strips.astype(int) - whole.astype(int)).mean() < 2
    expected = np.asarray(Image.fromarray(s.image).resize((80, 80), Image.BOX)).astype(int)
    assert np.abs(whole.astype(int) - expected).mean() < 3


# ---- argument checks, pickling, workers -------------------------------------------------
def test_read_region_argument_errors(synthetic):
    r = open_slide(synthetic("pages", "jpeg").path)
    with pytest.raises(ValueError, match="level 9 does not exist"):
        r.read_region((0, 0), 9, (10, 10))
    with pytest.raises(ValueError, match="size must be positive"):
        r.read_region((0, 0), 0, (0, 10))
    with pytest.raises(TypeError, match="level must be an int"):
        r.read_region((0, 0), 1.0, (10, 10))
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read_region((0, 0), 0, (10, 10))


def test_outside_the_slide_reads_white(synthetic):
    r = open_slide(synthetic("pages", "jpeg").path)
    assert (r.read_region((5000, 5000), 0, (32, 32)) == 255).all()
    part = r.read_region((2040, 0), 0, (16, 4))
    assert (part[:, 8:] == 255).all()


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_readers_pickle_by_path(synthetic, backend):
    r = open_slide(synthetic("pages", "jpeg").path, backend=backend, cache_bytes=1 << 20)
    clone = pickle.loads(pickle.dumps(r))
    assert clone.backend == backend and clone.path == r.path and clone._options == {"cache_bytes": 1 << 20}
    np.testing.assert_array_equal(clone.read_region((100, 100), 1, (64, 64)), r.read_region((100, 100), 1, (64, 64)))


class _RegionDataset(Dataset):
    def __init__(self, reader, locations):
        self.reader, self.locations = reader, locations

    def __len__(self):
        return len(self.locations)

    def __getitem__(self, i):
        return torch.from_numpy(self.reader.read_region(self.locations[i], 0, (96, 96)))


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_reader_opened_in_parent_reads_correctly_in_forked_workers(synthetic, backend):
    r = open_slide(synthetic("pages", "jpeg").path, backend=backend)
    rng = np.random.default_rng(0)
    locs = [tuple(int(v) for v in rng.integers(0, 1900, 2)) for _ in range(24)]
    expected = torch.stack([torch.from_numpy(r.read_region(loc, 0, (96, 96))) for loc in locs])  # parent used it
    loader = DataLoader(_RegionDataset(r, locs), batch_size=4, num_workers=2,
                        multiprocessing_context="fork" if os.name == "posix" else None)
    got = torch.cat(list(loader))
    assert torch.equal(got, expected)


# ---- bad input ---------------------------------------------------------------------------
def test_truncated_file_is_a_clear_error(synthetic, tmp_path):
    src = synthetic("pages", "jpeg").path
    bad = tmp_path / "truncated.tif"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(SlideFormatError, match=r"truncated\.tif"):
        open_slide(bad)
    with pytest.raises(SlideTruncatedError, match="truncated"):
        open_slide(bad, backend="tifffile")
    tiny = tmp_path / "header_only.tif"
    tiny.write_bytes(data[:6])
    with pytest.raises(SlideError, match=r"header_only\.tif"):
        open_slide(tiny)


def test_non_pyramidal_and_non_slide_files(tmp_path):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((300, 200, 3), np.uint8), photometric="rgb", rowsperstrip=16)
    with pytest.raises(NotPyramidalError, match=r"flat\.tif.*not a tiled/pyramidal slide"):
        open_slide(flat)
    png = tmp_path / "picture.png"
    Image.new("RGB", (32, 32)).save(png)
    with pytest.raises(SlideOpenError, match=r"picture\.png.*not a recognised slide format"):
        open_slide(png)
    with pytest.raises(SlideOpenError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="unknown slide backend 'bogus'"):
        open_slide(png, backend="bogus")
    with pytest.raises(SlideOpenError, match=r"picture\.png.*KFB"):
        open_slide(png, backend="kfb")
    grey16 = tmp_path / "grey16.tif"
    tifffile.imwrite(grey16, np.zeros((512, 512), np.uint16), tile=(256, 256))
    with pytest.raises(SlideFormatError, match=r"grey16\.tif.*only 8-bit brightfield"):
        open_slide(grey16, backend="tifffile")
    assert open_slide(grey16).backend == "openslide"  # auto hands what tifffile refuses to OpenSlide


def test_grey_and_rgba_tiled_tiffs_read_as_rgb(tmp_path):
    grey = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(128, 128), photometric="minisblack")
    r = open_slide(path)
    out = r.read_region((10, 0), 0, (20, 4))
    np.testing.assert_array_equal(out, np.repeat(grey[:4, 10:30, None], 3, axis=2))
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:, 128:, 3] = 0  # transparent half reads as white
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(128, 128), photometric="rgb", extrasamples=["unassalpha"])
    out = open_slide(path).read_region((0, 0), 0, (256, 256))
    assert (out[:, :128] == [200, 0, 0]).all() and (out[:, 128:] == 255).all()
