"""``medmeta-train`` with ``trainer.device=cuda``: a run interrupted after its checkpoint and
resumed on the GPU ends where an uninterrupted run ends (RNG states of CUDA included), and its
checkpoint evaluates on the CPU. Skipped without a GPU (``tests/conftest.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from medmeta.learners.state import read_checkpoint
from medmeta.training.run import run_training

pytestmark = pytest.mark.gpu

CONF = Path(__file__).resolve().parents[2] / "conf"


def _overrides(learner: str, run_dir: Path, steps: int) -> list[str]:
    overrides = [
        f"learner={learner}", "data=synthetic", "backbone=conv4_tiny", "trainer=debug", f"trainer.steps={steps}",
        "trainer.device=cuda", "trainer.checkpoint_every=2", "trainer.val_every=2", "trainer.val_episodes=1",
        "trainer.meta_batch_size=2", "trainer.batch_size=8", "trainer.val_max_items=8", "trainer.test=false",
        "sampler.shot_range=[1,2]", "sampler.n_query=2", "logger=none", f"run_dir={run_dir}",
    ]
    if learner == "maml":
        overrides += ["learner.inner_steps=1", "learner.eval_inner_steps=1"]
    return overrides


def _train(learner: str, run_dir: Path, steps: int) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_training(compose("train", overrides=_overrides(learner, run_dir, steps)))


@pytest.mark.parametrize("learner", ["protonet", "maml", "mm_pt"])
def test_cuda_run_resumed_from_its_checkpoint_ends_like_an_uninterrupted_one(learner, tmp_path, synthetic_data) -> None:
    torch.backends.cudnn.deterministic, saved = True, torch.backends.cudnn.deterministic
    try:
        _train(learner, tmp_path / "straight", 6)
        _train(learner, tmp_path / "resumed", 4)  # stops after the step-4 checkpoint
        assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 4
        final = _train(learner, tmp_path / "resumed", 6)  # same folder: resumes at step 4
    finally:
        torch.backends.cudnn.deterministic = saved
    assert final["steps_done"] == 6
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")  # loaded onto the CPU
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight["model"].items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
