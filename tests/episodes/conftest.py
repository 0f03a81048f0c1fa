"""Fixtures for episode tests."""
from __future__ import annotations

import pytest
from episode_fixtures import make_source


@pytest.fixture
def source_factory():
    return make_source
