"""One checkpoint format: a file written by the public ``save_learner`` evaluates through
``medmeta-evaluate checkpoint=...`` (the app's ``run_evaluation``) and gives, episode for episode,
the metrics of the learner it was saved from; old-format files still load."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import medmeta.training.run as run_module
from medmeta.errors import CheckpointError
from medmeta.learners import ProtoNet, load_learner, save_learner
from medmeta.training.checkpoint import checkpoint_backbone, load_checkpoint

CONF = Path(__file__).resolve().parents[2] / "conf"
EVAL = [
    "data=synthetic", "data.test.dataset_ids=[syn_derm,syn_xray]", "backbone=conv4_tiny", "backbone.pretrained=null",
    "protocol=quick", "protocol.shots=[1]", "protocol.instances=2", "protocol.n_query=2", "progress=false",
    "~learner@learners.finetune",
]
KEYS = ["method", "dataset", "task", "shots", "instance"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEYS).reset_index(drop=True)


@pytest.mark.slow
def test_save_learner_file_evaluates_like_the_learner_in_memory(tmp_path, synthetic_data, monkeypatch):
    cfg = _compose(EVAL)
    torch.manual_seed(123)  # weights unlike the ones the app would build from its own seed
    learner = run_module.build_learner(cfg.learners.protonet, run_module.build_backbone(cfg.backbone))
    assert isinstance(learner, ProtoNet)
    learner.set_feature_mean(torch.randn(learner.num_features))  # state beyond the backbone
    path = save_learner(tmp_path / "protonet.pt", learner)

    evaluated = run_module.run_evaluation(_compose([*EVAL, f"checkpoint={path}", f"run_dir={tmp_path / 'ckpt'}"]))

    # the reference: the same protocol on the learner in memory (linear probe: on its backbone)
    original = run_module.build_learner

    def in_memory(lcfg, backbone, **kwargs):
        if kwargs.get("where") == "learners.protonet":
            return copy.deepcopy(learner)
        return original(lcfg, copy.deepcopy(learner.backbone), **kwargs)

    monkeypatch.setattr(run_module, "build_learner", in_memory)
    reference = run_module.run_evaluation(_compose([*EVAL, f"run_dir={tmp_path / 'memory'}"]))
    assert set(evaluated["method"]) == {"protonet", "linear_probe"}
    assert len(evaluated) == len(reference) > 0
    pd.testing.assert_frame_equal(_rows(evaluated)[KEYS], _rows(reference)[KEYS])
    for metric in ("auroc", "accuracy"):
        pd.testing.assert_series_equal(_rows(evaluated)[metric], _rows(reference)[metric], rtol=1e-6)


def test_one_format_for_learners_and_runs(tmp_path) -> None:
    from medmeta.backbones import create_backbone

    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("medmeta_conv4_tiny", in_chans=1))
    ckpt = load_checkpoint(save_learner(tmp_path / "new.pt", learner))
    assert ckpt["format"] == "medmeta-checkpoint" and ckpt["version"] == 2
    assert ckpt["architecture"] == {"learner": "ProtoNet", "backbone": "medmeta_conv4_tiny", "num_features": 16,
                                    "in_chans": 1}
    assert ckpt["backbone_prefix"] == "backbone." and ckpt["config"] == {} and ckpt["extra"] == {}
    assert checkpoint_backbone(ckpt) == {"name": "medmeta_conv4_tiny", "in_chans": 1}
    assert checkpoint_backbone({**ckpt, "config": {"backbone": {"name": "resnet18", "in_chans": 3}}})["name"] == "resnet18"
    with pytest.raises(CheckpointError, match=r"checkpoint x.pt: records neither the config of its run nor its backbone"):
        checkpoint_backbone({**ckpt, "architecture": {}}, "x.pt")

    # a file of the former save_learner format ("medmeta-learner") still loads everywhere
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in learner.state_dict().items()}
    legacy = {"format": "medmeta-learner", "version": 1, "architecture": ckpt["architecture"], "state_dict": state,
              "optimizer": None, "extra": {"step": 7}}
    torch.save(legacy, tmp_path / "old.pt")
    read = load_checkpoint(tmp_path / "old.pt")
    assert read["format"] == "medmeta-checkpoint" and read["backbone_prefix"] == "backbone."
    assert all(torch.equal(read["model"][k], v) for k, v in state.items())
    other = ProtoNet(create_backbone("medmeta_conv4_tiny", in_chans=1))
    assert load_learner(tmp_path / "old.pt", other) == {"step": 7}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())

    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "medmeta-checkpoint", "version": 9}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 9"):
        load_checkpoint(tmp_path / "future.pt")
