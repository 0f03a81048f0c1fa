"""Checkpoints: atomic writes, weights_only round trips, RNG states, compatibility errors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medmeta.training import checkpoint as ck


def _payload(**extra):
    return {"format": ck.CHECKPOINT_FORMAT, "version": ck.CHECKPOINT_VERSION, "step": 3, **extra}


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_torch_save(_payload(weights=torch.ones(3)), path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_torch_save(_payload(weights=torch.zeros(3)), path)
    monkeypatch.undo()
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(5), np.random.rand(5), random.random()
    ck.atomic_torch_save(_payload(rng=ck.capture_rng_state()), tmp_path / "c.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(3))
    torch.rand(100), np.random.rand(100), random.random()  # move every generator on
    state = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]
    ck.restore_rng_state(state)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(3))
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    assert np.array_equal(expected[3], got[3])


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(ck.IncompatibleCheckpointError, match="not a medmeta checkpoint"):
        ck.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ck.IncompatibleCheckpointError, match="weights_only=True"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_check_compatible_names_every_difference():
    saved = {"learner": {"name": "maml", "inner_lr": 0.1}, "trainer": {"meta_batch_size": 4}, "tasks": ["a/x"]}
    current = {"learner": {"name": "maml", "inner_lr": 0.5}, "trainer": {"meta_batch_size": 4}, "tasks": ["a/x", "b/y"],
               "extra": 1}
    ck.check_compatible({"fingerprint": saved}, saved, "ok.pt")  # identical: no error
    with pytest.raises(ck.IncompatibleCheckpointError) as info:
        ck.check_compatible({"fingerprint": saved}, current, "run/last.pt")
    text = str(info.value)
    assert "run/last.pt" in text and "3 difference(s)" in text
    assert "learner.inner_lr: checkpoint has 0.1, this run has 0.5" in text
    assert "tasks: checkpoint has ['a/x'], this run has ['a/x', 'b/y']" in text
    assert "extra: in this run" in text


def test_backbone_prefix_and_state_split():
    backbone = torch.nn.Linear(2, 2)
    model = torch.nn.Module()
    model.backbone = backbone
    model.head = torch.nn.Linear(2, 1)
    prefix = ck.find_backbone_prefix(model, backbone)
    assert prefix == "backbone."
    weights = ck.backbone_state_dict(model.state_dict(), prefix)
    assert set(weights) == {"weight", "bias"}
    assert torch.equal(weights["weight"], backbone.weight)
