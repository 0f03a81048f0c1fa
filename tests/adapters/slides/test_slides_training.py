"""MIL training through the one TrainingLoop: metrics.csv, checkpoints, and a resumed run that ends
bit-identical to an uninterrupted one."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from medmeta.adapters.slides.mil import Bags, create_mil_head, train_mil
from medmeta.errors import ConfigError
from medmeta.tasks import TaskDescription, TaskTarget

BINARY = TaskDescription(TaskTarget.BINARY_CLASSIFICATION, ("neg", "pos"), "toy: mil", "toy")
# 7 bags in batches of 2: 4 steps per epoch (the last batch holds one bag); 3 epochs = 12 steps
N_BAGS, BATCH, EPOCHS, STEPS = 7, 2, 3, 12


class Interrupted(Exception):
    pass


def _bags(seed=0):
    rng = np.random.default_rng(seed)
    bags = [torch.from_numpy(rng.normal(size=(int(rng.integers(6, 12)), 8)).astype(np.float32)) for _ in range(N_BAGS)]
    return Bags(bags), torch.tensor([i % 2 for i in range(N_BAGS)], dtype=torch.float32)[:, None]


def _head():
    torch.manual_seed(0)
    return create_mil_head("abmil", 8, BINARY, dropout=0.25)  # dropout: the global RNG must resume too


def _train(model, run_dir, **kw):
    bags, labels = _bags()
    return train_mil(model, bags, labels, BINARY, epochs=EPOCHS, lr=1e-2, batch_size=BATCH, max_instances=5,
                     seed=3, run_dir=run_dir, **kw)


def _interrupt_at(model, step):
    """Make the model's loss raise at (0-based) ``step``: a run killed mid-training."""
    calls = {"n": 0}
    loss = model.loss

    def failing(*args, **kwargs):
        if calls["n"] == step:
            raise Interrupted(f"killed at step {step}")
        calls["n"] += 1
        return loss(*args, **kwargs)

    model.loss = failing


def _losses(run_dir):
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[df["name"] == "train/loss"].set_index("step")["value"]


def test_train_mil_writes_metrics_and_checkpoints(tmp_path):
    history = _train(_head(), tmp_path / "run", checkpoint_every=4)
    assert len(history) == EPOCHS and history[-1] < history[0]
    losses = _losses(tmp_path / "run")
    assert list(losses.index) == list(range(1, STEPS + 1))  # one row per step
    # an epoch's loss is the bag-weighted mean of its steps (batches of 2, 2, 2 and 1 bags)
    weights = np.array([2, 2, 2, 1]) / N_BAGS
    for epoch in range(EPOCHS):
        steps = losses.loc[4 * epoch + 1 : 4 * epoch + 4].to_numpy()
        assert history[epoch] == pytest.approx(float((steps * weights).sum()), rel=1e-12)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize(
    "stop, every",
    [(STEPS // 2, STEPS // 2),  # killed after N of 2N steps, mid-epoch, right after a checkpoint
     (5, 2)],  # killed one step after the checkpoint at an epoch boundary: that step is redone
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, stop, every):
    full_model = _head()
    full = _train(full_model, tmp_path / "full", checkpoint_every=every)

    broken = _head()
    _interrupt_at(broken, stop)
    with pytest.raises(Interrupted):
        _train(broken, tmp_path / "resumed", checkpoint_every=every)
    resumed_model = _head()  # a new process: the same construction, then the checkpoint
    resumed = _train(resumed_model, tmp_path / "resumed", resume=True, checkpoint_every=every)

    assert resumed == full  # every epoch's loss, the ones before the interruption included
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    pd.testing.assert_series_equal(_losses(tmp_path / "resumed"), _losses(tmp_path / "full"))


def test_without_run_dir_results_equal_a_run_with_one(tmp_path):
    a = _head()  # seeds the global RNG (dropout) before each run
    without = _train(a, None)
    b = _head()
    assert without == _train(b, tmp_path / "run")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="needs run_dir"):
        _train(_head(), None, resume=True)
    with pytest.raises(ConfigError, match="last.pt does not exist"):
        _train(_head(), tmp_path / "empty", resume=True)
    _train(_head(), tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(_head(), tmp_path / "run", resume=False)
    assert any("starting fresh" in str(w.message) for w in caught)
