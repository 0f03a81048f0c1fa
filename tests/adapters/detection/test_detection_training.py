"""Detector training through the one TrainingLoop: metrics.csv, and a run killed after N of 2N steps
that resumes to exactly the weights and losses of an uninterrupted run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from medmeta.adapters.slides.detection.detector import build_detector, train_detector

N = 3  # steps before the interruption; the run has 2N. 5 items in batches of 2 (drop_last): 2 steps per epoch


class Interrupted(Exception):
    pass


class Patches:
    """Five 64 px images, four with a box and one negative; ``fail_at`` raises on that item read."""

    def __init__(self, fail_at=None):
        gen = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 64, 64, generator=gen) for _ in range(5)]
        self.fail_at, self.reads, self.epochs = fail_at, 0, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return 5

    def __getitem__(self, i):
        if self.reads == self.fail_at:
            raise Interrupted(f"killed at read {self.reads}")
        self.reads += 1
        if i == 4:
            return self.images[i], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        box = torch.tensor([[4.0 + 8 * i, 6.0, 30.0 + 8 * i, 28.0]])
        return self.images[i], {"boxes": box, "labels": torch.tensor([1])}


def _model():
    torch.manual_seed(0)  # Faster R-CNN samples proposals with the global RNG: it must resume too
    return build_detector(arch="fasterrcnn", fpn_channels=16)


def _train(model, data, run_dir, **kw):
    return train_detector(model, data, iterations=2 * N, batch_size=2, lr=2e-3, warmup=2, log=None, seed=5,
                          run_dir=run_dir, checkpoint_every=N, log_every=1, **kw)


def _rows(run_dir, name):
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[df["name"] == name].set_index("step")["value"]


def test_resumed_detector_training_is_bit_identical(tmp_path):
    full_model, full_data = _model(), Patches()
    full = _train(full_model, full_data, tmp_path / "full")
    assert len(full) == 2 * N and {"loss", "loss_classifier", "loss_box_reg"} <= set(full[0])
    assert full_data.epochs == [0, 1, 2]  # a new epoch (new augmentation draws) every 2 steps
    assert list(_rows(tmp_path / "full", "train/loss").index) == list(range(1, 2 * N + 1))

    with pytest.raises(Interrupted):  # the (N+1)-th step's first read fails: last.pt holds step N
        _train(_model(), Patches(fail_at=2 * N), tmp_path / "resumed")
    resumed_model = _model()
    resumed = _train(resumed_model, Patches(), tmp_path / "resumed", resume=True)

    assert resumed == full
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name in ("train/loss", "train/lr"):
        pd.testing.assert_series_equal(_rows(tmp_path / "resumed", name), _rows(tmp_path / "full", name))


def test_train_detector_restores_trainability_after_an_error(tmp_path):
    model = _model()
    head = list(model.roi_heads.box_predictor.cls_score.parameters())
    with pytest.raises(Interrupted):
        train_detector(model, Patches(fail_at=0), iterations=2, batch_size=2, parameters=head, log=None)
    assert all(p.requires_grad for p in model.parameters())


def test_cli_train_writes_a_run_folder_and_resumes_it(cytology_sets, tmp_path, capsys):
    from medmeta.adapters.slides.detection.cli import main
    from medmeta.adapters.slides.detection.detector import load_detector

    root = cytology_sets.root / "train"
    args = ["train", "--slides", str(root / "slides"), "--annotations", str(root / "annotations"),
            "--arch", "retinanet", "--backbone", "medmeta_conv4_tiny", "--fpn-channels", "16", "--patch-size", "96",
            "--cell-patches", "2", "--background-patches", "1", "--negative-patches", "2", "--iterations", "3",
            "--batch-size", "2", "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--out", str(tmp_path / "a.pt")]) == 0
    assert "[train_detector] step 3/3 loss" in capsys.readouterr().out
    assert list(_rows(tmp_path / "run", "train/loss").index) == [3]  # log_every=50 (the default): the last step only
    # the same command again finds the finished run and continues it: no step left, the same weights
    assert main([*args, "--out", str(tmp_path / "b.pt")]) == 0
    a, b = load_detector(tmp_path / "a.pt"), load_detector(tmp_path / "b.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
