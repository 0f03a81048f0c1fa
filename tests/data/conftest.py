"""Fixtures of the data-layer tests: hand-written datasets and a small synthetic meta-dataset."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from data_fixtures import build_hand_root  # noqa: E402


@pytest.fixture(scope="session")
def hand_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only root with four hand-written datasets (copy before corrupting anything)."""
    return build_hand_root(tmp_path_factory.mktemp("hand") / "root")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic meta-dataset at 16 px, 60 images per dataset (read-only)."""
    from medmeta.recipes import build_synthetic_meta_dataset

    return build_synthetic_meta_dataset(tmp_path_factory.mktemp("synthetic") / "root", seed=0, image_size=16,
                                        num_images=60)
