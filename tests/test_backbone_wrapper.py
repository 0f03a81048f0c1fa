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


def test_conv4_channels_last_on_cpu_equals_the_nchw_path() -> None:
    """The CPU layout switch changes speed, not results: features, dense maps and gradients equal
    the NCHW path up to float32 rounding; dense maps come back contiguous; vmap keeps working."""
    from medmeta.backbones.conv4 import Conv4

    torch.manual_seed(0)
    fast = Conv4(in_chans=3, num_classes=0, width=16)
    plain = Conv4(in_chans=3, num_classes=0, width=16, channels_last_on_cpu=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(6, 3, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    maps_fast, maps_plain = fast.forward_intermediates(x, intermediates_only=True), plain.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(maps_fast, maps_plain):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fast(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)
    fast.eval()  # BatchNorm under vmap reads running statistics
    batched = torch.func.vmap(lambda xb: torch.func.functional_call(fast, dict(fast.named_parameters()), (xb,)))(x.view(2, 3, 3, 28, 28))
    torch.testing.assert_close(batched.reshape(6, -1), fast(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("learner, steps, channels_last", [("fomaml", 3, True), ("maml", 1, True), ("maml", 3, False)])
def test_maml_meta_trains_in_the_faster_cpu_layout(learner: str, steps: int, channels_last: bool) -> None:
    """Conv-4 runs channels-last on the CPU, except where second-order MAML backpropagates twice
    through it (two or more inner steps), whose double-backward kernels are faster in NCHW."""
    from medmeta.learners import create_learner
    from medmeta.modes import cpu_channels_last
    from medmeta.tasks import Episode, TaskDescription

    backbone = create_backbone("medmeta_conv4_tiny")
    seen: list[bool] = []
    first_conv = backbone.model.blocks[0][0]
    first_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    d = TaskDescription("MULTICLASS_CLASSIFICATION", ("a", "b"), "toy: task", "toy")
    y = torch.tensor([0, 0, 1, 1])
    episode = Episode(torch.randn(4, 3, 16, 16), y, torch.randn(4, 3, 16, 16), y, d)
    create_learner(learner, backbone, inner_steps=steps).meta_backward([episode])
    assert seen and all(flag == channels_last for flag in seen)
    seen.clear()
    with cpu_channels_last(False):
        backbone(torch.randn(2, 3, 16, 16))
    assert seen == [False]
