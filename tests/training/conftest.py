"""Fixtures for training tests: a tiny in-memory meta-dataset with learnable classes."""
from __future__ import annotations

import pytest

from tiny_meta import TinyMetaDataset


@pytest.fixture(scope="session")
def tiny_meta() -> TinyMetaDataset:
    return TinyMetaDataset()
