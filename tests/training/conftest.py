"""Fixtures for training tests: a tiny in-memory meta-dataset with learnable classes, and the
embedded synthetic meta-dataset built once per session into a temporary MEDMETA_DATA_DIR
(subprocesses started by the app tests inherit the variable and find it already built)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from tiny_meta import TinyMetaDataset


@pytest.fixture(scope="session")
def tiny_meta() -> TinyMetaDataset:
    return TinyMetaDataset()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MEDMETA_DATA_DIR pointing at a session folder holding the built synthetic meta-dataset."""
    from medmeta.recipes import open_default

    data_dir = tmp_path_factory.mktemp("medmeta_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDMETA_DATA_DIR", str(data_dir))
        meta = open_default("synthetic")
        assert len(meta.tasks) > 0
        yield data_dir
