"""Every slide backend takes the options open_slide passes on (``cache_bytes``), keeps them when a
reader is pickled to a DataLoader worker, and reads with them."""
from __future__ import annotations

import inspect
import pickle

import pytest

from medmeta.adapters.slides.backends import backend_class, backend_installed, list_backends
from medmeta.adapters.slides.backends.base import DEFAULT_CACHE_BYTES
from medmeta.adapters.slides.errors import SlideOpenError
from medmeta.adapters.slides.reader import open_slide
from medmeta.adapters.slides.tiling import TileDataset, tile_slide

OPTIONS = {"cache_bytes": 8 * 1024 * 1024}


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_signature_takes_open_slides_options(name):
    cls = backend_class(name)  # the modules import without their optional package
    signature = inspect.signature(cls)
    signature.bind("slide.tif", **OPTIONS)  # raises TypeError for a backend without the option
    assert signature.parameters["cache_bytes"].default == DEFAULT_CACHE_BYTES


@pytest.mark.parametrize("name", list_backends())
def test_open_slide_passes_its_options_to_every_backend(name, synthetic):
    if not backend_installed(name):
        pytest.skip(f"backend {name!r} is optional and not installed here")
    slide = synthetic("pages", "jpeg")
    if name == "kfb":  # no KFB sample ships: the options reach kfbslide, which refuses a TIFF
        with pytest.raises(SlideOpenError, match="kfbslide cannot open it"):
            open_slide(slide.path, backend="kfb", **OPTIONS)
        return
    with open_slide(slide.path, backend=name, **OPTIONS) as reader:
        assert reader.backend == name and reader.cache_bytes == OPTIONS["cache_bytes"]
        assert reader.read_region((0, 0), 0, (32, 16)).shape == (16, 32, 3)
        clone = pickle.loads(pickle.dumps(reader))  # how a DataLoader worker gets it
        try:
            assert clone.backend == name and clone.cache_bytes == OPTIONS["cache_bytes"]
        finally:
            clone.close()
    grid = tile_slide(slide.path, tile_size=64, mpp=2.0, min_tissue=0.0, backend=name)
    tiles = TileDataset(slide.path, grid, backend=name, **OPTIONS)
    try:
        assert tiles[0][0].shape[-2:] == (64, 64) and tiles.reader.cache_bytes == OPTIONS["cache_bytes"]
    finally:
        tiles.close()


def test_cache_bytes_must_not_be_negative(synthetic):
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        open_slide(synthetic("pages", "jpeg").path, backend="tifffile", cache_bytes=-1)
