"""The Hydra apps end to end on the embedded synthetic meta-dataset (tiny backbone, few steps).

The train / evaluate / sweep commands run as subprocesses (``@hydra.main`` owns global state);
the other learners run in-process through Hydra's ``compose`` and :func:`run_training`, which is
what the apps call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from medmeta.errors import ConfigError
from medmeta.training.run import run_evaluation, run_training

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TRAIN = str(ROOT / "experiments" / "train.py")
EVALUATE = str(ROOT / "experiments" / "evaluate.py")

# a few steps of everything: validation and checkpoints every 2 steps, a 1-shot test protocol
FAST_TRAIN = [
    "data=synthetic", "backbone=conv4_tiny", "trainer=debug", "trainer.steps=4", "trainer.val_every=2",
    "trainer.checkpoint_every=2", "trainer.val_episodes=2", "trainer.meta_batch_size=2",
    "sampler.shot_range=[1,2]", "sampler.n_query=2",
    "protocol=quick", "protocol.shots=[1]", "protocol.instances=2", "protocol.n_query=2",
    "data.test.dataset_ids=[syn_derm,syn_xray]",  # multi-class, binary and multi-label test tasks
]
FAST_EVAL = [
    "data=synthetic", "data.test.dataset_ids=[syn_derm,syn_xray]", "backbone=conv4_tiny", "backbone.pretrained=null",
    "protocol=quick", "protocol.shots=[1]", "protocol.instances=2", "protocol.n_query=2", "progress=false",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}


def _app(script: str, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *overrides], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-4000:]
    return proc.stdout


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=overrides)


def _test_rows(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["dataset", "task", "shots", "instance"]
    return df.sort_values(keys).reset_index(drop=True)


@pytest.mark.slow
def test_train_protonet_then_evaluate_app_on_its_checkpoint(tmp_path, synthetic_data):
    """Training writes config, logs, checkpoints and results; evaluate.py on the saved best
    checkpoint reproduces the test results of the training run exactly (same weights, same
    frozen episodes)."""
    run = tmp_path / "protonet"
    final = run_training(_compose("train", [*FAST_TRAIN, "learner=protonet", "logger=csv", f"run_dir={run}"]))
    assert final["steps_done"] == 4 and final["learner"] == "protonet"
    trained = pd.read_csv(run / "test" / "results.csv")
    tasks = json.loads((run / "tasks.json").read_text())
    assert sorted(set(trained["dataset"] + "/" + trained["task"])) == sorted(tasks["test"])
    assert final["test"]["methods"]["protonet"]["mean_over_tasks"] == pytest.approx(
        100 * trained.groupby(["dataset", "task"])["auroc"].mean().mean(), rel=1e-9)

    ev = tmp_path / "evaluate"
    out = _ok(_app(EVALUATE, *FAST_EVAL, "~learner@learners.linear_probe", "~learner@learners.finetune",
                   f"checkpoint={run}", f"hydra.run.dir={ev}"))
    assert "mean over tasks" in out and f"weights: checkpoint {run}" in out
    evaluated = pd.read_csv(ev / "results.csv")
    assert set(evaluated["method"]) == {"protonet"}
    pd.testing.assert_series_equal(_test_rows(evaluated)["auroc"], _test_rows(trained)["auroc"], rtol=1e-5)
    for name in ("config.yaml", "results_table.txt", "final_metrics.json", "summary.md", ".hydra/overrides.yaml"):
        assert (ev / name).is_file(), name


def test_mm_pt_pretrains_heads_and_is_tested_by_finetuning(tmp_path, synthetic_data):
    cfg = _compose("train", [
        "experiment=mm_pt", *FAST_TRAIN, "trainer.batch_size=16", "trainer.val_max_items=16",
        "test_learner.steps=2", "logger=csv", f"run_dir={tmp_path}",
    ])
    final = run_training(cfg)
    assert final["learner"] == "mm_pt" and final["steps_done"] == 4
    assert set(final["test"]["methods"]) == {"finetune"}
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert "val/auroc" in set(metrics["name"])
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    heads = {k.split(".")[1] for k in best["model"] if k.startswith("heads.")}
    assert len(heads) == len(json.loads((tmp_path / "tasks.json").read_text())["train"])  # one head per task
    backbone = torch.load(tmp_path / "checkpoints" / "best_backbone.pt", weights_only=True)
    assert set(backbone) and all(isinstance(v, torch.Tensor) for v in backbone.values())


@pytest.mark.parametrize("experiment,learner", [("fomaml", "fomaml"), ("mm_maml", "maml")])
def test_maml_variants_meta_train_and_test(tmp_path, synthetic_data, experiment, learner):
    cfg = _compose("train", [
        f"experiment={experiment}", *FAST_TRAIN, "learner.inner_steps=1", "learner.eval_inner_steps=2",
        "logger=csv", f"run_dir={tmp_path}",
    ])
    final = run_training(cfg)
    assert final["learner"] == learner and final["steps_done"] == 4
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["fingerprint"]["learner"]["name"] == learner
    loss = pd.read_csv(tmp_path / "metrics.csv").query("name == 'train/loss'")["value"]
    assert len(loss) == 4 and np.isfinite(loss).all()
    results = pd.read_csv(tmp_path / "test" / "results.csv")
    assert set(results["method"]) == {learner} and results["auroc"].between(0, 1).all()


@pytest.mark.slow
def test_multirun_sweep_of_two_learners_and_its_ranking(tmp_path, synthetic_data):
    """train.py --multirun over two learners: each job folder holds the resolved config, CSV and
    TensorBoard logs, checkpoints and test results; collect_sweep.py ranks them per task and
    averages the ranks (checked against a direct computation)."""
    sweep = tmp_path / "sweep"
    proc = _app(TRAIN, "--multirun", "learner=protonet,fomaml", *FAST_TRAIN, "trainer.steps=2", "logger=default",
                f"hydra.sweep.dir={sweep}", timeout=240)
    out = _ok(proc)
    assert out.count("mean over tasks") == 2
    for job, learner in (("0", "protonet"), ("1", "fomaml")):
        run = sweep / job
        assert yaml.safe_load((run / "config.yaml").read_text())["learner"]["name"] == learner
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[0] == f"learner={learner}"
        metrics = pd.read_csv(run / "metrics.csv")
        assert {"train/loss", "val/auroc"} <= set(metrics["name"])
        assert sorted(metrics.loc[metrics["name"] == "val/auroc", "step"]) == [2]
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        for name in ("last.pt", "best.pt", "best_backbone.pt"):
            assert (run / "checkpoints" / name).is_file(), name
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
        assert json.loads((run / "final_metrics.json").read_text())["steps_done"] == 2

    collect = _ok(subprocess.run([sys.executable, str(ROOT / "experiments" / "collect_sweep.py"), str(sweep)],
                                 env=_env(), capture_output=True, text=True, timeout=120))
    assert "2 run(s), 2 method(s); score: auroc" in collect
    ranking = pd.read_csv(sweep / "sweep_ranking.csv")
    assert set(ranking["method"]) == {"protonet", "fomaml"}

    # the known answer: rank the two methods on each task by mean AUROC, average the ranks
    rows = pd.concat([pd.read_csv(sweep / j / "test" / "results.csv") for j in ("0", "1")])
    per_task = rows.groupby(["dataset", "task", "method"])["auroc"].mean().unstack("method")
    ranks = per_task.rank(axis=1, ascending=False, method="average").mean()
    for r in ranking.itertuples():
        assert r.mean_rank == pytest.approx(ranks[r.method])
    assert (sweep / "sweep_summary.md").read_text().startswith("# Sweep ranking (auroc")


# bad input: named before any long work --------------------------------------------------------
def test_unknown_option_is_named_by_the_app(tmp_path):
    proc = _app(TRAIN, "trainer.stepz=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "stepz" in proc.stderr and "TrainerConfig" in proc.stderr
    assert not (tmp_path / "config.yaml").exists()
    with pytest.raises(ConfigCompositionException, match="distanse"):
        _compose("train", ["learner=protonet", "learner.distanse=cosine"])


def test_user_errors_end_the_app_with_one_line_and_status_2(tmp_path):
    """A wrong data root reaches the command line as one named error, not Hydra's traceback."""
    proc = _app(TRAIN, "data=medimeta", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.py: error: data.root=" in proc.stderr and "the folder does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_root_is_named(tmp_path):
    cfg = _compose("train", ["data=medimeta", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.root is required for data=medimeta"):
        run_training(cfg)
    cfg = _compose("train", ["data=medimeta", f"data.root={tmp_path / 'nowhere'}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere: the folder does not exist"):
        run_training(cfg)


def test_unknown_dataset_or_task_is_named_with_what_exists(tmp_path, synthetic_data):
    from medmeta.recipes import open_default

    ids = sorted({e.dataset_id for e in open_default("synthetic").tasks})
    cfg = _compose("train", [*FAST_TRAIN, "data.target=no_such_dataset", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.target: unknown dataset id 'no_such_dataset'") as info:
        run_training(cfg)
    assert str(ids) in str(info.value)
    cfg = _compose("evaluate", [*FAST_EVAL, f"data.test.tasks=[{ids[0]}/no_such_task]", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"data.test.tasks: dataset '{ids[0]}' has no task 'no_such_task'; its tasks are"):
        run_evaluation(cfg)


def test_incompatible_checkpoints_are_rejected_before_work(tmp_path, synthetic_data):
    from medmeta.training.checkpoint import IncompatibleCheckpointError

    run = tmp_path / "run"
    run_training(_compose("train", [*FAST_TRAIN, "trainer.steps=2", "trainer.test=false", "logger=none",
                                    f"run_dir={run}"]))
    # resume with another backbone: the fingerprint check names the difference and the file
    with pytest.raises(IncompatibleCheckpointError, match=r"backbone.name") as info:
        run_training(_compose("train", [*FAST_TRAIN, "backbone=conv4", "trainer.resume_from=" + str(run),
                                        "logger=none", f"run_dir={tmp_path / 'other'}"]))
    assert "last.pt" in str(info.value)
    # a plain weights file is not a medmeta checkpoint
    with pytest.raises(ValueError, match="best_backbone.pt"):
        run_evaluation(_compose("evaluate", [*FAST_EVAL, f"checkpoint={run / 'checkpoints' / 'best_backbone.pt'}",
                                             f"run_dir={tmp_path / 'ev'}"]))


def test_missing_pretrained_package_falls_back_only_when_asked(monkeypatch):
    import medmeta.backbones.pretrained as pretrained
    from medmeta.training.components import build_backbone

    def not_installed(name):
        raise ModuleNotFoundError(f"pretrained source {name!r} needs the package X, which is not installed")

    monkeypatch.setattr(pretrained, "source_weights_file", not_installed)
    cfg = {"name": "mobilenetv2_100", "pretrained": "imagenet-mobilenetv2", "in_chans": 3, "timm_kwargs": {}}
    with pytest.raises(ConfigError, match=r"backbone.pretrained=imagenet-mobilenetv2: .*not installed.*if_unavailable=random"):
        build_backbone({**cfg, "if_unavailable": "error"})
    with pytest.warns(UserWarning, match="FALLING BACK to a randomly initialised"):
        backbone = build_backbone({**cfg, "if_unavailable": "random"})
    assert backbone.weights_origin.startswith("random (fallback: imagenet-mobilenetv2")


def test_console_commands_find_the_configs():
    code = "import sys; from medmeta.cli import evaluate; sys.argv[0] = 'medmeta-evaluate'; evaluate()"
    proc = subprocess.run([sys.executable, "-c", code, "--cfg", "job"], env=_env(), capture_output=True,
                          text=True, timeout=120, cwd="/")
    job = yaml.safe_load(_ok(proc))
    assert job["data"]["name"] == "real_mini"
    assert set(job["learners"]) == {"protonet", "linear_probe", "finetune"}
    assert job["backbone"]["pretrained"] == "imagenet-mobilenetv2"
