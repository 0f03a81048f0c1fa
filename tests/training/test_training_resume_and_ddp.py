"""Resume and distributed training give exactly the trajectory of one uninterrupted process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import medmeta.training.run as run_module
from medmeta.training.checkpoint import IncompatibleCheckpointError
from medmeta.training.loop import EpisodicObjective

HERE = Path(__file__).resolve().parent
CONF = HERE.parents[1] / "conf"

# MAML with dropout (drop_rate) so per-episode torch seeding matters, a cosine schedule so the
# scheduler state matters, checkpoints every 2 steps and validation every 3.
OVERRIDES = [
    "trainer=debug", "trainer.steps=6", "trainer.checkpoint_every=2", "trainer.val_every=3",
    "trainer.scheduler=cosine", "trainer.meta_batch_size=4", "trainer.test=false", "trainer.val_episodes=4",
    "learner=maml", "learner.inner_steps=2", "learner.eval_inner_steps=2",
    "sampler.shot_range=[1,3]", "sampler.n_query=3", "+backbone.timm_kwargs.drop_rate=0.2", "logger=csv",
]


@pytest.fixture
def stand_in_data(monkeypatch, tiny_meta):
    monkeypatch.setattr(run_module, "open_meta_dataset", lambda cfg, *args: tiny_meta)


def _train(run_dir: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, f"run_dir={run_dir}", *extra])
        return run_module.run_training(cfg)


def _model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def _metrics(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[~df["name"].isin(["train/items_per_s"])][["step", "name", "value"]].reset_index(drop=True)


def test_interrupted_run_resumes_to_identical_parameters(tmp_path, monkeypatch, stand_in_data):
    full = _train(tmp_path / "full")
    assert full["steps_done"] == 6

    original = EpisodicObjective.train_step
    calls = {"n": 0}

    def killed_after_three_steps(self, step):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated kill during step 4")
        return original(self, step)

    monkeypatch.setattr(EpisodicObjective, "train_step", killed_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut")
    assert _model(tmp_path / "cut")["step"] == 2  # the last checkpoint before the kill
    monkeypatch.setattr(EpisodicObjective, "train_step", original)

    resumed = _train(tmp_path / "cut")  # trainer.resume=null: resumes from the run folder
    assert resumed["resumed_from_step"] == 2 and resumed["steps_done"] == 6
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert a["scheduler"] == b["scheduler"]
    assert a["data"] == b["data"] == {"kind": "episodic", "stream": {"next_episode": 24, "world_size": 1}}
    assert full["best_metric"] == resumed["best_metric"]
    pd.testing.assert_frame_equal(_metrics(tmp_path / "full"), _metrics(tmp_path / "cut"))


def test_incompatible_checkpoint_is_rejected_before_training(tmp_path, monkeypatch, stand_in_data):
    _train(tmp_path / "run", "trainer.steps=2")

    def must_not_train(self, step):
        raise AssertionError("training started despite an incompatible checkpoint")

    monkeypatch.setattr(EpisodicObjective, "train_step", must_not_train)
    with pytest.raises(IncompatibleCheckpointError) as info:
        _train(tmp_path / "run", "trainer.steps=4", "trainer.resume=true", "learner.inner_lr=0.5",
               "trainer.meta_batch_size=2")
    text = str(info.value)
    assert "learner.inner_lr: checkpoint has 0.1, this run has 0.5" in text
    assert "trainer.meta_batch_size: checkpoint has 4, this run has 2" in text
    assert str(tmp_path / "run" / "checkpoints" / "last.pt") in text


def test_resume_true_without_checkpoint_names_the_path(tmp_path, stand_in_data):
    with pytest.raises(ValueError, match=r"trainer.resume=true but .*checkpoints/last.pt does not exist"):
        _train(tmp_path / "fresh", "trainer.resume=true")


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun with 2 CPU processes: every step's averaged meta-gradient and the final
    parameters equal those of one process running the same episodes."""
    overrides = [o for o in OVERRIDES if not o.startswith("trainer.scheduler")] + ["trainer.steps=3", "trainer.val_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    worker = str(HERE / "ddp_worker.py")
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    ddp_worker.run(str(tmp_path / "one.pt"), str(tmp_path / "one"), overrides)  # the one-process reference
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, worker, str(tmp_path / "two.pt"), str(tmp_path / "two"), *overrides],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(one["grads"]) == len(two["grads"]) == 3
    for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
        assert g1.abs().sum() > 0
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6, msg=f"averaged gradient of step {step + 1}")
    params = [k for k in one["model"] if "running" not in k and "num_batches" not in k]
    for key in params:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    # rank 0 alone wrote the run folder: no per-rank copies, one metrics file
    assert not list((tmp_path / "two").glob("*rank1*"))
    assert (tmp_path / "two" / "metrics.csv").is_file()
