"""Metric logging: long-format CSV, TensorBoard events, resume truncation, optional W&B."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from medmeta.training.loggers import MetricLogger, check_backends


def test_csv_and_tensorboard_backends_write_the_logged_values(tmp_path):
    with MetricLogger(tmp_path, ["csv", "tensorboard"], config={"lr": 0.1}) as logger:
        logger.log({"train/loss": 1.5, "note": "text is ignored"}, step=1)
        logger.log({"train/loss": 1.25, "val/auroc": 0.75}, step=2)
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert list(df.columns) == ["step", "name", "value", "time"]
    assert df[["step", "name", "value"]].values.tolist() == [
        [1, "train/loss", 1.5], [2, "train/loss", 1.25], [2, "val/auroc", 0.75]
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.5), (2, 1.25)]


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    with MetricLogger(tmp_path, ["csv"]) as logger:
        for step in range(1, 6):
            logger.log({"train/loss": float(step)}, step)
    with MetricLogger(tmp_path, ["csv"], resume_step=3) as logger:  # the checkpoint was at step 3
        logger.log({"train/loss": 40.0}, 4)
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert df["step"].tolist() == [1, 2, 3, 4]
    assert df["value"].tolist() == [1.0, 2.0, 3.0, 40.0]


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "run", ["csv", "tensorboard"], enabled=False)
    logger.log({"x": 1.0}, 1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_unknown_backend_and_missing_wandb_give_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="logger.backends: unknown backend 'mlflow'"):
        check_backends(["csv", "mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(ImportError, match=r"pip install 'medmeta\[wandb\]'"):
        MetricLogger(tmp_path, ["csv", "wandb"])
