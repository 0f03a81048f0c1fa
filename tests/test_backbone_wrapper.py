"""The timm backbone wrapper: feature sizes, grayscale handling, dense features, safe weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta.backbones import create_backbone


def test_pooled_and_dense_features_have_declared_sizes() -> None:
    b = create_backbone("medmeta_conv4_tiny")
    x = torch.randn(3, 3, 32, 32)
    assert b(x).shape == (3, b.num_features)
    feats = b.dense_features(x)
    assert [f.shape[1] for f in feats] == b.feature_channels
    assert [32 // f.shape[-1] for f in feats] == b.feature_reductions


def test_grayscale_is_repeated_and_other_counts_are_refused() -> None:
    torch.manual_seed(0)
    b = create_backbone("medmeta_conv4_tiny").eval()
    gray = torch.randn(2, 1, 16, 16)
    assert torch.allclose(b(gray), b(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="2 channels"):
        b(torch.randn(2, 2, 16, 16))
    one = create_backbone("medmeta_conv4_tiny", in_chans=1)
    assert one(gray).shape == (2, 16)


def test_local_weights_round_trip_and_mismatch_is_explained(tmp_path: Path) -> None:
    a = create_backbone("medmeta_conv4_tiny")
    path = tmp_path / "w.pt"
    torch.save(a.model.state_dict(), path)
    b = create_backbone("medmeta_conv4_tiny", pretrained=str(path))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    other = create_backbone("medmeta_conv4")
    with pytest.raises(ValueError, match="shape mismatches"):
        other.load_weights(path)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("no_such_net")
