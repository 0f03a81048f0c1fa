"""Early stopping: patience counts rounds without improvement; the state resumes exactly."""
from __future__ import annotations

import math

import pytest

from medmeta.training.early_stopping import EarlyStopping


def test_patience_and_best():
    es = EarlyStopping(patience=2, mode="max")
    assert es.update(0.5, 10) and es.best == 0.5
    assert not es.update(0.5, 20)  # equal is no improvement
    assert not es.should_stop
    assert es.update(0.6, 30) and es.bad_rounds == 0 and es.best_step == 30
    es.update(0.55, 40), es.update(math.nan, 50)
    assert es.should_stop and es.best == 0.6


def test_min_mode_min_delta_and_state_round_trip():
    es = EarlyStopping(patience=3, mode="min", min_delta=0.1)
    es.update(1.0, 1)
    assert not es.update(0.95, 2)  # within min_delta
    assert es.update(0.8, 3)
    copy = EarlyStopping(patience=3, mode="min", min_delta=0.1)
    copy.load_state_dict(es.state_dict())
    assert (copy.best, copy.best_step, copy.bad_rounds) == (0.8, 3, 0)


def test_never_stops_without_patience_and_rejects_bad_settings():
    es = EarlyStopping(patience=None)
    for i in range(20):
        es.update(0.1, i)
    assert not es.should_stop
    with pytest.raises(ValueError, match="monitor_mode"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
