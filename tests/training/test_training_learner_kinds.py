"""Every learner in ``conf/learner/`` either trains through ``medmeta-train`` or is refused with
one line before any data is opened, according to its declared ``training_kind``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from medmeta.errors import exit_on_user_error
from medmeta.learners.registry import LEARNERS
from medmeta.training.run import run_training

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "learner").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def _kind(option: str):
    return LEARNERS.get(str(_compose([f"learner={option}"]).learner.name)).training_kind


REFUSED = [o for o in OPTIONS if _kind(o) is None]
TRAINABLE = [o for o in OPTIONS if _kind(o) is not None]
NO_DATA = ["data=medimeta", "data.root=/nonexistent/medmeta-data"]  # opening it would fail with a data error


def test_the_learner_options_cover_both_kinds() -> None:
    assert {"linear_probe", "finetune", "finetune_short"} <= set(REFUSED)
    assert {"protonet", "maml", "mm_pt"} <= set(TRAINABLE)


@pytest.mark.parametrize("option", REFUSED)
def test_untrainable_learner_is_refused_in_one_line_before_the_data(option, tmp_path, capsys) -> None:
    cfg = _compose([f"learner={option}", *NO_DATA, f"run_dir={tmp_path / 'run'}"])
    name = str(cfg.learner.name)
    with pytest.raises(SystemExit) as info:
        exit_on_user_error("medmeta-train", run_training, cfg)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"medmeta-train: error: learner={name} is not trainable")
    assert f"medmeta-evaluate +learner@learners.{name}={name}" in lines[0]  # the fix
    assert "protonet" in lines[0] and "maml" in lines[0]  # the trainable alternatives
    assert "data.root" not in lines[0]  # refused before the (missing) data was opened
    assert not (tmp_path / "run").exists()  # and before the run folder was made


def test_console_app_refuses_linear_probe_with_one_stderr_line(tmp_path) -> None:
    code = "import sys; from medmeta.cli import train; sys.argv[0] = 'medmeta-train'; train()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "learner=linear_probe", *NO_DATA, f"hydra.run.dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("medmeta-train: error: learner=linear_probe is not trainable")
    assert not (tmp_path / "config.yaml").exists()


def _fast(option: str, run_dir: Path) -> list[str]:
    overrides = [
        f"learner={option}", "data=synthetic", "backbone=conv4_tiny", "trainer=debug", "trainer.steps=2",
        "trainer.meta_batch_size=2", "trainer.val_episodes=1", "trainer.batch_size=8", "trainer.val_max_items=8",
        "trainer.test=false", "sampler.shot_range=[1,2]", "sampler.n_query=2", "logger=none", f"run_dir={run_dir}",
    ]
    fields = set(_compose([f"learner={option}"]).learner)
    if "inner_steps" in fields:
        overrides += ["learner.inner_steps=1", "learner.eval_inner_steps=1"]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("option", TRAINABLE)
def test_trainable_learner_trains_two_steps(option, tmp_path, synthetic_data) -> None:
    final = run_training(_compose(_fast(option, tmp_path)))
    assert final["steps_done"] == 2 and final["learner"] == str(_compose([f"learner={option}"]).learner.name)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 2


@pytest.mark.slow
def test_untrainable_learner_runs_test_only_with_zero_steps(tmp_path, synthetic_data) -> None:
    """experiment=linear_probe (and im_pt, finetune) set trainer.steps=0: nothing is trained, the
    learner is only tested, so it is not refused."""
    cfg = _compose([
        "experiment=linear_probe", "data=synthetic", "backbone=conv4_tiny", "trainer=debug", "trainer.steps=0",
        "trainer.val_episodes=0", "protocol=quick", "protocol.shots=[1]", "protocol.instances=2",
        "protocol.n_query=2", "data.test.dataset_ids=[syn_derm]", "logger=none", f"run_dir={tmp_path}",
    ])
    final = run_training(cfg)
    assert final["steps_done"] == 0 and set(final["test"]["methods"]) == {"linear_probe"}
