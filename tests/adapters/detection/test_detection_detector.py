"""Detectors over medmeta backbones: construction, native-scale transform, checkpoints, few-shot head."""
from __future__ import annotations

import pytest
import torch

from medmeta.adapters.slides.detection.detector import (
    DetectorConfig,
    TimmFPNBackbone,
    build_detector,
    classification_head_parameters,
    load_detector,
    predict_images,
    save_detector,
    train_detector,
)
from medmeta.backbones import create_backbone


def _targets(n):
    out = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 28.0]]), "labels": torch.tensor([1])} for _ in range(n - 1)]
    out.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})  # a negative patch
    return out


def test_fpn_over_timm_backbone_shapes():
    body = create_backbone("medmeta_conv4_tiny", out_indices=(1, 2, 3))
    fpn = TimmFPNBackbone(body, out_channels=24, extra_pool_level=True)
    feats = fpn(torch.rand(2, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "pool"]
    assert [tuple(f.shape) for f in feats.values()] == [(2, 24, 16, 16), (2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]
    assert fpn.strides == [4, 8, 16, 32] and fpn.out_channels == 24


@pytest.mark.parametrize("arch, cls_losses", [("fasterrcnn", "loss_classifier"), ("retinanet", "classification")])
def test_build_train_step_and_predict(arch, cls_losses):
    torch.manual_seed(0)
    model = build_detector(arch=arch, fpn_channels=16)
    model.train()
    losses = model([torch.rand(3, 64, 64) for _ in range(3)], _targets(3))
    assert cls_losses in losses and all(torch.isfinite(v) for v in losses.values())
    # the native-scale transform leaves tile pixels and boxes at their size (no resize to min_size)
    model.eval()
    images, _ = model.transform([torch.rand(3, 80, 72)])
    assert images.image_sizes == [(80, 72)] and images.tensors.shape[-2:] == (96, 96)  # padded to /32 only
    out = predict_images(model, torch.randint(0, 256, (2, 80, 72, 3), dtype=torch.uint8))
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    if len(out[0]["boxes"]):
        assert out[0]["boxes"][:, 2].max() <= 72 and out[0]["boxes"][:, 3].max() <= 80


def test_config_errors():
    with pytest.raises(ValueError, match="arch"):
        DetectorConfig(arch="yolo")
    with pytest.raises(ValueError, match="2 sizes for 3 pyramid levels"):
        build_detector(anchor_sizes=(16, 32))
    with pytest.raises(ValueError, match="unknown field"):
        DetectorConfig.from_dict({"arch": "retinanet", "colour": 1})
    with pytest.raises(ValueError, match="unknown timm model"):
        build_detector(backbone="no_such_net")


def test_checkpoint_roundtrip_and_safety(tmp_path):
    torch.manual_seed(0)
    model = build_detector(arch="fasterrcnn", fpn_channels=16, score_thresh=0.0)
    path = save_detector(tmp_path / "ckpt" / "det.pt", model, extra={"note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["det.pt"]  # atomic: no temp file left
    again = load_detector(path)
    assert again.detector_config == model.detector_config
    x = torch.rand(1, 3, 64, 64)
    a, b = predict_images(model, x)[0], predict_images(again, x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    # a pickle with code is refused by weights_only loading
    torch.save({"format": "medmeta.detector/1", "obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_detector(tmp_path / "evil.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medmeta detector checkpoint"):
        load_detector(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "missing.pt")


def test_backbone_weights_only_from_local_file(tmp_path):
    body = create_backbone("medmeta_conv4_tiny")
    torch.nn.init.constant_(body.model.blocks[0][0].weight, 0.123)
    torch.save(body.model.state_dict(), tmp_path / "w.pt")
    model = build_detector(arch="retinanet", fpn_channels=16, pretrained=str(tmp_path / "w.pt"))
    assert torch.allclose(model.backbone.body.model.blocks[0][0].weight, torch.tensor(0.123))
    with pytest.raises(ValueError, match="neither an existing weights file"):
        build_detector(pretrained=str(tmp_path / "absent.pt"))


def test_train_detector_restricts_parameters_and_losses():
    torch.manual_seed(0)
    model = build_detector(arch="fasterrcnn", fpn_channels=16)
    data = [(torch.rand(3, 64, 64), t) for t in _targets(4)]
    head = classification_head_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = train_detector(model, data, iterations=3, batch_size=2, parameters=head, loss_keys=["loss_classifier"], log=None)
    assert len(hist) == 3 and "loss_classifier" in hist[0]
    head_ids = {id(p) for p in head}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in head_ids), n
    with pytest.raises(ValueError, match="not among the model's losses"):
        train_detector(model, data, iterations=1, loss_keys=["focal"], log=None)
    with pytest.raises(ValueError, match="dataset is empty"):
        train_detector(model, [], iterations=1, log=None)
