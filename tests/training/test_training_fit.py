"""medmeta.training.fit: the one in-process driver of TrainingLoop (adapters train through it).

A run killed inside a ``log_every`` window and resumed must log the same ``train/loss`` rows,
and end with the same ``best.pt``, as an uninterrupted run.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd
import pytest
import torch
from torch import nn

from medmeta.errors import ConfigError
from medmeta.training.checkpoint import load_checkpoint
from medmeta.training.fit import LoopSettings, fit, resume_checkpoint


class _Killed(Exception):
    pass


class _ToyObjective:
    """Regression of a fixed target; batch ``k`` depends only on the step number."""

    kind = "toy"

    def __init__(self, model: nn.Module, kill_at: Optional[int] = None) -> None:
        self.model = model
        self.kill_at = kill_at

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert state["kind"] == self.kind

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def train_step(self, step: int) -> dict[str, float]:
        if step == self.kill_at:
            raise _Killed(step)
        x = torch.linspace(-1, 1, 8).view(4, 2) + 0.1 * step
        loss = ((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        return {"loss_sum": float(loss.detach()), "count": 1.0}

    def validate(self) -> dict[str, float]:
        return {}


def _run(run_dir, steps: int = 7, kill_at: Optional[int] = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = LoopSettings.for_steps(steps, checkpoint_every=1, log_every=3)
    fit(model, _ToyObjective(model, kill_at), optimizer, settings, fingerprint={"toy": 1}, run_dir=run_dir)
    return model


def _losses(run_dir) -> list[tuple[int, float]]:
    df = pd.read_csv(run_dir / "metrics.csv")
    rows = df[df["name"] == "train/loss"]
    return [(int(s), float(v)) for s, v in zip(rows["step"], rows["value"])]


def test_resume_inside_a_log_window_logs_like_an_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole")
    with pytest.raises(_Killed):
        _run(tmp_path / "cut", kill_at=4)  # steps 0..3 done and checkpointed; the window holds steps 3 and 4
    resumed = _run(tmp_path / "cut")
    assert [s for s, _ in _losses(tmp_path / "whole")] == [3, 6, 7]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    # without validation the best checkpoint is the last state, resumed or not
    best_whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "best.pt")
    best_cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "best.pt")
    assert best_whole["step"] == best_cut["step"] == 7
    assert all(torch.equal(best_whole["model"][k], best_cut["model"][k]) for k in best_whole["model"])


def test_a_finished_run_continued_for_more_steps_ends_with_the_last_state_as_best(tmp_path):
    _run(tmp_path / "run", steps=3)  # finished: best.pt is the state at step 3
    longer = _run(tmp_path / "run", steps=7)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["step"] == 7
    assert all(torch.equal(best["model"][k], v) for k, v in longer.state_dict().items())


def test_resume_rule(tmp_path):
    assert resume_checkpoint(tmp_path, None) is None
    with pytest.raises(ConfigError, match="resume=true but .*last.pt does not exist"):
        resume_checkpoint(tmp_path, True)
    _run(tmp_path, steps=1)
    assert resume_checkpoint(tmp_path, None) == tmp_path / "checkpoints" / "last.pt"
    with pytest.warns(UserWarning, match="starting fresh"):
        assert resume_checkpoint(tmp_path, False) is None
    with pytest.raises(ConfigError, match="needs run_dir"):
        fit(nn.Linear(1, 1), None, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
            LoopSettings.for_steps(1), fingerprint={}, resume=True)
