"""Unit tests of the segmentation heads: hand-computed logits, the meta-learning inner loop,
input checks, shapes for label and multi-label masks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from seg_heads_fixtures import IdentityBackbone

from medmeta.adapters.segmentation.heads import (
    LinearProbeSegmenter,
    PrototypeSegmenter,
    SegmentationEpisode,
    UNetSegmenter,
    as_segmentation_episode,
    check_support_set,
    create_segmenter,
    list_segmenters,
    meta_train,
)
from medmeta.adapters.segmentation.heads.linear import hypercolumns_at
from medmeta.backbones import create_backbone
from medmeta.tasks import Episode, TaskDescription

# support features (channels last) [[(1,0), (0,1)], [(1,1), (2,0)]], foreground on the diagonal
SUPPORT = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]  # (1, 2, 2, 2)
MASK = torch.tensor([[[1, 0], [0, 1]]])
QUERY = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)


def _cos(a, b):
    return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))


def test_prototype_logits_equal_hand_computation():
    # fg prototype = mean((1,0), (2,0)) = (1.5, 0); bg prototype = mean((0,1), (1,1)) = (0.5, 1)
    fg, bg = _cos((3, 4), (1.5, 0)), _cos((3, 4), (0.5, 1))
    seg = PrototypeSegmenter(IdentityBackbone(2), scale=20.0)
    logits = seg.adapt(SUPPORT, MASK, 1)(QUERY)
    assert logits.shape == (1, 2, 1, 1)
    torch.testing.assert_close(logits.flatten(), torch.tensor([20 * bg, 20 * fg]))
    # ADNet: the background logit is scale * threshold
    seg = PrototypeSegmenter(IdentityBackbone(2), scale=20.0, background="threshold", threshold=0.5)
    torch.testing.assert_close(seg.adapt(SUPPORT, MASK, 1)(QUERY).flatten(), torch.tensor([10.0, 20 * fg]))
    # multi-label: one logit, foreground minus background score
    seg = PrototypeSegmenter(IdentityBackbone(2), scale=20.0)
    ml = seg.adapt(SUPPORT, MASK[:, None].float(), 1)(QUERY)
    torch.testing.assert_close(ml.flatten(), torch.tensor([20 * (fg - bg)]))


def test_local_prototypes_equal_hand_computation():
    # grid 1 x 1, threshold 1: every support pixel is a local prototype of its class
    seg = PrototypeSegmenter(IdentityBackbone(2), scale=20.0, local_prototypes=True, grid_size=1, local_threshold=1.0)
    logits = seg.adapt(SUPPORT, MASK, 1)(QUERY).flatten()

    def combine(protos):
        s = [20 * _cos((3, 4), p) for p in protos]
        z = sum(math.exp(v) for v in s)
        return sum(math.exp(v) / z * v for v in s)

    expected = [combine([(0.5, 1), (0, 1), (1, 1)]), combine([(1.5, 0), (1, 0), (2, 0)])]
    torch.testing.assert_close(logits, torch.tensor(expected))


def test_hypercolumns_equal_bilinear_upsampling():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    pixels = torch.tensor([[0, 0, 0], [1, 31, 31], [0, 5, 17], [1, 12, 3]])
    got = hypercolumns_at(maps, pixels, (32, 32))
    up = torch.cat([F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False) for m in maps], 1)
    torch.testing.assert_close(got, up[pixels[:, 0], :, pixels[:, 1], pixels[:, 2]])


def test_linear_probe_separates_a_linearly_separable_feature():
    # the identity backbone's feature is the image: foreground pixels are bright
    torch.manual_seed(0)
    mask = (torch.rand(2, 16, 16) > 0.7).long()
    img = (mask.float() + 0.1 * torch.randn(2, 16, 16))[:, None]
    seg = LinearProbeSegmenter(IdentityBackbone(1), steps=100)
    pred = seg.adapt(img, mask, 1)(img).argmax(1)
    assert (pred == mask).float().mean() > 0.98


@pytest.fixture()
def tiny_episode():
    torch.manual_seed(0)
    img = torch.rand(2, 1, 32, 32)
    mask = (img[:, 0] > 0.6).long()
    mask[:, :6] = 2
    return img, mask


@pytest.mark.parametrize("name", ["prototype", "linear", "unet"])
def test_every_head_gives_logits_at_query_resolution(name, tiny_episode):
    img, mask = tiny_episode
    bb = create_backbone("medmeta_conv4_tiny", out_indices=(0, 1))
    kw = {"steps": 5} if name == "linear" else {"finetune_steps": 2} if name == "unet" else {}
    seg = create_segmenter(name, bb, **kw)
    query = torch.rand(3, 1, 24, 40)
    assert seg.adapt(img, mask, 2)(query).shape == (3, 3, 24, 40)
    multilabel = torch.stack([mask == 1, mask >= 1], 1).float()  # overlapping labels
    assert seg.adapt(img, multilabel, 2)(query).shape == (3, 2, 24, 40)


@pytest.mark.parametrize("algorithm", ["fomaml", "maml", "anil"])
def test_inner_loop_changes_only_decoder_parameters(algorithm, tiny_episode):
    img, mask = tiny_episode
    torch.manual_seed(0)
    seg = UNetSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0, 1)), meta_algorithm=algorithm,
                        inner_steps=2, inner_lr=0.1, decoder_channels=8, embed_dim=8)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    support = check_support_set(img, mask, 2)
    start = seg.decoder_params()
    params, head = seg.inner_loop(seg.features(img, seg.levels), support, start)
    assert set(params) == set(start)  # only decoder parameters are adapted, never the backbone's
    changed = [k for k in params if not torch.equal(params[k], start[k])]
    if algorithm == "anil":
        assert changed == []  # ANIL: only the head moves in the inner loop
    else:
        assert changed, "the inner loop did not change the decoder"
    assert head["weight"].shape == (3, 8)
    loss = seg.meta_loss([SegmentationEpisode(img, mask, img, mask, 2)])
    loss.backward()
    assert all(p.grad is None for p in seg.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.decoder.parameters())
    for k, v in seg.state_dict().items():  # nothing was changed in place
        assert torch.equal(v, before[k]), k


def test_meta_train_lowers_the_meta_loss(tiny_episode):
    img, mask = tiny_episode
    torch.manual_seed(0)
    seg = UNetSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0, 1)), inner_steps=1,
                        decoder_channels=8, embed_dim=8, head_init="zero", dice_weight=0.0)
    batch = [(img, mask, img, mask, 2)]
    first = float(seg.meta_loss(batch).detach())
    backbone_before = {k: v.clone() for k, v in seg.backbone.state_dict().items()}
    history = meta_train(seg, lambda: batch, steps=15, lr=1e-2)
    assert len(history) == 15 and float(seg.meta_loss(batch).detach()) < first
    assert all(torch.equal(v, seg.backbone.state_dict()[k]) for k, v in backbone_before.items())


def test_prototype_meta_loss_reaches_the_backbone(tiny_episode):
    img, mask = tiny_episode
    seg = PrototypeSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0,)))
    seg.meta_loss([(img, mask, img, mask, 2)]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.backbone.parameters())


def test_fine_tuning_the_backbone_works_on_copies(tiny_episode):
    img, mask = tiny_episode
    torch.manual_seed(0)
    seg = UNetSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0, 1)), finetune_steps=3,
                        finetune_backbone=True, backbone_lr=1e-2, decoder_channels=8, embed_dim=8)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    frozen = UNetSegmenter(seg.backbone, finetune_steps=3, decoder_channels=8, embed_dim=8)
    frozen.decoder.load_state_dict(seg.decoder.state_dict())
    a = seg.adapt(img, mask, 2)(img)
    b = frozen.adapt(img, mask, 2)(img)
    assert not torch.allclose(a, b)  # the backbone copy was trained
    assert all(torch.equal(v, seg.state_dict()[k]) for k, v in before.items())


# bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prototype", "linear", "unet"])
def test_bad_support_gives_clear_errors(name, tiny_episode):
    img, mask = tiny_episode
    seg = create_segmenter(name, create_backbone("medmeta_conv4_tiny", out_indices=(0,)))
    with pytest.raises(ValueError, match=r"support_masks: shape \(2, 32, 31\) does not match"):
        seg.adapt(img, mask[..., :31], 2)
    with pytest.raises(ValueError, match=r"values must lie in 0..1 .* found 0..2"):
        seg.adapt(img, mask, 1)
    with pytest.raises(ValueError, match="no pixel of label 2"):
        seg.adapt(img, mask.clamp(max=1), 2)
    with pytest.raises(ValueError, match="no pixel of label 1"):
        seg.adapt(img, torch.zeros_like(mask), 1)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        seg.adapt(img, mask.float(), 2)
    with pytest.raises(ValueError, match="num_labels"):
        seg.adapt(img, mask, 0)
    with pytest.raises(ValueError, match=r"multi-label shape \(2, 1, 32, 32\) does not match"):
        seg.adapt(img, (mask[:, None] > 0).float(), 2)
    with pytest.raises(ValueError, match="no pixel of foreground of label 1"):
        seg.adapt(img, torch.zeros(2, 1, 32, 32), 1)
    with pytest.raises(ValueError, match="query_images: 3 channels"):
        seg.adapt(img, mask, 2)(torch.rand(1, 3, 32, 32))


def test_registry_and_constructor_errors():
    bb = create_backbone("medmeta_conv4_tiny", out_indices=(0,))
    assert list_segmenters() == ["linear", "prototype", "unet"]
    with pytest.raises(ValueError, match="unknown segmenter 'fcn'; known segmenters: 'linear', 'prototype', 'unet'"):
        create_segmenter("fcn", bb)
    with pytest.raises(ValueError, match="levels: 3 is not a feature level"):
        create_segmenter("prototype", bb, levels=[3])
    with pytest.raises(ValueError, match="meta_algorithm"):
        create_segmenter("unet", bb, meta_algorithm="reptile")
    with pytest.raises(TypeError, match="has no 'dense_features'"):
        create_segmenter("prototype", torch.nn.Linear(2, 2))


def test_amp_is_a_no_op_on_cpu(tiny_episode):
    img, mask = tiny_episode
    bb = create_backbone("medmeta_conv4_tiny", out_indices=(0, 1))
    a = PrototypeSegmenter(bb).adapt(img, mask, 2)(img)
    b = PrototypeSegmenter(bb, amp=True).adapt(img, mask, 2)(img)
    torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["prototype", "linear", "unet"])
def test_heads_on_cuda_with_mixed_precision(name, tiny_episode):
    img, mask = (t.cuda() for t in tiny_episode)
    torch.manual_seed(0)
    bb = create_backbone("medmeta_conv4_tiny", out_indices=(0, 1))
    kw = {"steps": 20} if name == "linear" else {"finetune_steps": 5} if name == "unet" else {}
    full = create_segmenter(name, bb, **kw).cuda()
    mixed = create_segmenter(name, bb, amp=True, **kw).cuda()
    if name == "unet":
        mixed.decoder.load_state_dict(full.decoder.state_dict())
    a = full.adapt(img, mask, 2)(img)
    b = mixed.adapt(img, mask, 2)(img)
    assert a.device.type == "cuda" and a.dtype == torch.float32 and torch.isfinite(b).all()
    agree = (a.argmax(1) == b.argmax(1)).float().mean()
    assert agree > 0.9, float(agree)
    if name == "unet":
        loss = mixed.meta_loss([(img, mask, img, mask, 2)])
        loss.backward()
        assert torch.isfinite(loss)


def test_medmeta_episodes_are_accepted(tiny_episode):
    img, mask = tiny_episode
    desc = TaskDescription("BINARY_SEGMENTATION", ("background", "a", "b"), "toy: seg", "toy")
    ep = as_segmentation_episode(Episode(img, mask, img, mask, desc))
    assert ep.num_labels == 2 and ep.support_masks is mask
    seg = PrototypeSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0,)))
    assert seg.predict(Episode(img, mask, img, mask, desc)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="lacks support/query masks"):
        as_segmentation_episode(object())
