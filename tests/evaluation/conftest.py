"""Fixtures for evaluation tests."""
from __future__ import annotations

import pytest
from eval_fixtures import TinyCentroidLearner, class_source


@pytest.fixture
def source_factory():
    return class_source


@pytest.fixture
def tiny_learner():
    return TinyCentroidLearner()
