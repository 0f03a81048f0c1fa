"""Tiling: the right level, read size and coordinates for a requested scale; tissue filtering;
HDF5 coordinates with fingerprints; parallel tile reads."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medmeta.adapters.slides.errors import FingerprintMismatchError, NoTissueError, ScaleUnavailableError, SlideError
from medmeta.adapters.slides.reader import open_slide
from medmeta.adapters.slides.tiling import TileDataset, TileGrid, TileTransform, read_tile, tile_slide


@pytest.fixture()
def pages(synthetic):
    return open_slide(synthetic("pages", "jpeg").path)


def test_mpp_picks_the_matching_level_and_snaps_to_stored_tiles(pages):
    g = tile_slide(pages, tile_size=224, mpp=1.0, min_tissue=0)
    assert (g.level, g.read_size, g.tile_size, g.mpp) == (1, 224, 224, 1.0)
    assert g.aligned and len(g) == 16  # one 224 read inside each stored 256 tile of level 1
    assert set(np.unique(g.coords % 512).tolist()) == {0}
    assert g.footprint == 448


def test_dense_grid_without_snapping(pages):
    g = tile_slide(pages, tile_size=224, mpp=1.0, min_tissue=0, snap_to_tiles=False)
    assert not g.aligned and len(g) == 16
    assert sorted(set(g.coords[:, 0].tolist())) == [0, 448, 896, 1344]


def test_scale_between_levels_reads_larger_and_resizes(pages):
    g = tile_slide(pages, tile_size=224, mpp=0.75, min_tissue=0)
    assert (g.level, g.read_size, g.mpp) == (0, 336, 0.75)
    assert len(g) == 36 and sorted(set(g.coords[:, 0].tolist()))[:3] == [0, 336, 672]
    tile = read_tile(pages, g, 7)
    assert tile.shape == (224, 224, 3)
    x, y = g.coords[7]
    region = pages.read_region((int(x), int(y)), 0, (336, 336))
    expected = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tile, expected)


def test_several_reads_per_stored_tile_when_they_fit(pages):
    g = tile_slide(pages, tile_size=128, mpp=2.0, min_tissue=0)
    assert (g.level, g.read_size, g.aligned, len(g)) == (2, 128, True, 16)
    assert sorted(set((g.coords[:, 0] // 4).tolist())) == [0, 128, 256, 384]


def test_near_level_scale_snaps_to_level_and_overlap(pages):
    g = tile_slide(pages, tile_size=224, mpp=0.52, min_tissue=0)
    assert (g.level, g.read_size) == (0, 224)
    g = tile_slide(pages, tile_size=224, level=1, overlap=32, min_tissue=0)
    assert sorted(set(g.coords[:, 0].tolist()))[:3] == [0, 384, 768]  # stride 192 at level 1


def test_magnification_uses_objective_power(synthetic):
    aperio = open_slide(synthetic("aperio", "jpeg").path)
    g = tile_slide(aperio, tile_size=224, magnification=10, min_tissue=0)
    assert (g.level, g.read_size, g.magnification) == (1, 224, 10.0)
    with pytest.raises(ScaleUnavailableError, match=r"magnification=40.*cannot give it"):
        tile_slide(aperio, magnification=40, min_tissue=0)


def test_scales_the_slide_cannot_give(pages, tmp_path):
    with pytest.raises(ScaleUnavailableError, match=r"mpp=0\.25.*no upsampling"):
        tile_slide(pages, mpp=0.25, min_tissue=0)
    with pytest.raises(ValueError, match="at most one of mpp, magnification, level"):
        tile_slide(pages, mpp=1.0, level=1)
    import tifffile

    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(ScaleUnavailableError, match="no microns per pixel"):
        tile_slide(path, mpp=1.0, min_tissue=0)
    with pytest.raises(SlideError, match="smaller than one tile"):
        tile_slide(path, tile_size=1024, min_tissue=0)


def test_real_slide_tiles_at_one_micron_per_pixel(cmu_svs):
    r = open_slide(cmu_svs)
    g = tile_slide(r, tile_size=224, mpp=1.0, min_tissue=0)
    assert g.level == 0 and g.read_size == 449  # 224 um / 0.499 um/px
    assert g.mpp == pytest.approx(1.0, abs=2e-3)
    assert len(g) == 4 * 6 and sorted(set(g.coords[:, 0].tolist())) == [0, 449, 898, 1347]
    kept = tile_slide(r, tile_size=224, mpp=1.0, min_tissue=0.5)
    assert 0 < len(kept) < len(g)
    assert read_tile(r, kept, 0).shape == (224, 224, 3)


@pytest.mark.parametrize("layout", ["pages", "subifd", "aperio"])
def test_tile_coordinates_at_requested_mpp_on_every_layout(synthetic, layout):
    """1 um/px on a 0.5 um/px slide: level 1 where the backend sees one, else level 0 read at 448 px
    and resized; the level-0 coordinates, and the pixels, agree across backends."""
    s = synthetic(layout, "jpeg")
    r = open_slide(s.path)  # tifffile: sees the sub-IFD pyramid and skips the Aperio thumbnail
    o = open_slide(s.path, backend="openslide")  # one level for sub-IFD pyramids
    g = tile_slide(r, tile_size=224, mpp=1.0, min_tissue=0, snap_to_tiles=False)
    go = tile_slide(o, tile_size=224, mpp=1.0, min_tissue=0, snap_to_tiles=False)
    assert (g.level, g.read_size, g.mpp, g.footprint) == (1, 224, 1.0, 448)
    assert sorted(set(g.coords[:, 0].tolist())) == sorted(set(g.coords[:, 1].tolist())) == [0, 448, 896, 1344]
    np.testing.assert_array_equal(go.coords, g.coords)
    assert (go.level, go.read_size) == ((0, 448) if layout == "subifd" else (1, 224))
    for i in (5, 9):
        a, b = read_tile(r, g, i).astype(int), read_tile(o, go, i).astype(int)
        if layout == "subifd":  # stored level 1 vs level 0 resized by 2: close, not equal
            assert np.abs(a - b).mean() < 3
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["pages", "subifd", "aperio"])
def test_tissue_filter_keeps_the_tiles_of_known_blobs(synthetic, layout):
    s = synthetic(layout, "jpeg")
    r = open_slide(s.path)
    everything = tile_slide(r, tile_size=128, mpp=0.5, min_tissue=0, snap_to_tiles=False)
    kept = tile_slide(r, tile_size=128, mpp=0.5, min_tissue=0.5, snap_to_tiles=False)
    truth = np.array([s.tissue_mask[y : y + 128, x : x + 128].mean() for x, y in everything.coords])
    kept_set = {tuple(c) for c in kept.coords.tolist()}
    must = {tuple(c) for c, t in zip(everything.coords.tolist(), truth) if t >= 0.75}
    may = {tuple(c) for c, t in zip(everything.coords.tolist(), truth) if t >= 0.25}
    assert must <= kept_set <= may
    assert len(must) > 20
    for bx, by, bw, bh in s.blob_boxes:  # every blob contributes tiles
        assert any(bx <= x < bx + bw and by <= y < by + bh for x, y in kept_set)
    assert kept.tissue is not None and (kept.tissue >= 0.5).all()


def test_no_tissue_is_a_clear_error(synthetic):
    s = synthetic("pages", "jpeg", blobs=0, size=(1024, 1024))
    with pytest.raises(NoTissueError, match=r"\.tif: no tissue detected"):
        tile_slide(s.path, mpp=1.0)


def test_h5_round_trip_and_fingerprint_check(synthetic, tmp_path):
    s = synthetic("pages", "jpeg")
    r = open_slide(s.path)
    g = tile_slide(r, tile_size=224, mpp=1.0, min_tissue=0.25)
    path = g.save_h5(tmp_path / "coords.h5")
    with h5py.File(path) as f:
        assert f["coords"].dtype == np.int32 and f["coords"].shape == (len(g), 2)
        assert f["coords"].attrs["patch_level"] == 1 and f["coords"].attrs["patch_size"] == 224
        assert f["coords"].attrs["slide_fingerprint"] == r.fingerprint
    back = TileGrid.load_h5(path, slide=r)
    np.testing.assert_array_equal(back.coords, g.coords)
    assert (back.level, back.read_size, back.tile_size, back.mpp) == (1, 224, 224, 1.0)
    other = open_slide(synthetic("aperio", "jpeg").path)
    with pytest.raises(FingerprintMismatchError, match="different"):
        TileGrid.load_h5(path, slide=other)
    clam = tmp_path / "clam.h5"  # a CLAM file: coords with patch_level / patch_size only
    with h5py.File(clam, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int32))
        d.attrs["patch_level"], d.attrs["patch_size"] = 1, 256
    with pytest.warns(UserWarning, match="no slide fingerprint"):
        c = TileGrid.load_h5(clam, slide=r)
    assert (c.level, c.read_size, c.tile_size, c.level_downsample) == (1, 256, 256, 2.0)
    with pytest.raises(ValueError, match="no 'coords' dataset"):
        with h5py.File(tmp_path / "empty.h5", "w"):
            pass
        TileGrid.load_h5(tmp_path / "empty.h5")


def test_tile_dataset_reads_in_parallel_workers(synthetic):
    s = synthetic("pages", "jpeg")
    r = open_slide(s.path)
    g = tile_slide(r, tile_size=64, mpp=1.5, min_tissue=0.3)
    assert g.read_size == 96 and g.level == 1
    ds = TileDataset(s.path, g)
    serial = torch.stack([ds[i][0] for i in range(len(ds))])
    expected0 = torch.from_numpy(read_tile(r, g, 0)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(serial[0], expected0)
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    images, coords = zip(*loader)
    assert torch.equal(torch.cat(images), serial)
    assert torch.equal(torch.cat(coords), torch.from_numpy(g.coords))


def test_tile_transform_and_fingerprint_guard(synthetic):
    s = synthetic("pages", "jpeg")
    g = tile_slide(s.path, tile_size=32, mpp=2.0, min_tissue=0.5)
    ds = TileDataset(s.path, g, transform=TileTransform((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    x, _ = ds[0]
    raw = torch.from_numpy(read_tile(open_slide(s.path), g, 0)).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[0], (raw[0] - 0.485) / 0.229, atol=1e-6)
    flipped = TileDataset(s.path, g, transform=lambda t: t[:, ::-1].copy())  # uint8 out -> default scaling
    assert torch.allclose(flipped[0][0], ds_default(s, g)[0].flip(-1))
    with pytest.raises(FingerprintMismatchError):
        TileDataset(synthetic("aperio", "jpeg").path, g)


def ds_default(s, g):
    return TileDataset(s.path, g)[0]
