"""Foundation backbones (ViT family) as feature extractors: pooled features, patch-token maps,
frozen-feature learners and segmentation heads on them, partial fine-tuning, Hydra presets.

All models are randomly initialised and small (ViT-Ti at 32-64 pixels); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medmeta.backbones import POOLS, create_backbone
from medmeta.errors import ConfigError
from medmeta.tasks import TaskDescription, TaskTarget

IMG = 64  # 4 x 4 patches of 16 pixels
CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"


def _vit(pool: str | None = None, **kwargs):
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", pool=pool, img_size=IMG, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_pooled_features_are_the_class_token_the_patch_mean_or_both(images):
    vit = _vit()
    with torch.no_grad():
        tokens = vit.model.forward_features(images)  # (B, 1 + 16, 192), final norm applied
        own = vit(images)
        token = _vit("token")(images)
        avg = _vit("avg")(images)
        both = _vit("token+avg")(images)
    assert tokens.shape == (3, 1 + 16, 192)
    assert torch.allclose(own, tokens[:, 0], atol=1e-6)  # ViT-Ti's own pooling is the class token
    assert torch.allclose(token, tokens[:, 0], atol=1e-6)
    assert torch.allclose(avg, tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(both, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), atol=1e-6)
    assert not torch.allclose(token, avg, atol=1e-3)
    assert (_vit("token").num_features, _vit("avg").num_features, _vit("token+avg").num_features) == (192, 192, 384)
    assert set(POOLS) == {"token", "avg", "token+avg"}


def test_avg_pool_skips_register_tokens(images):
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", pool="avg", img_size=IMG, reg_tokens=4).eval()
    assert vit.num_prefix_tokens == 5
    with torch.no_grad():
        tokens = vit.model.forward_features(images)
        assert torch.allclose(vit(images), tokens[:, 5:].mean(1), atol=1e-6)


def test_class_token_pooling_needs_a_class_token():
    with pytest.raises(ConfigError, match="no class token"):
        create_backbone("vit_tiny_patch16_224", pool="token", img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(ConfigError, match="no class token"):
        create_backbone("medmeta_conv4_tiny", pool="token")
    with pytest.raises(ConfigError, match="backbone.pool"):
        create_backbone("vit_tiny_patch16_224", pool="cls", img_size=32)
    assert create_backbone("medmeta_conv4_tiny", pool="avg")(torch.zeros(1, 3, 16, 16)).shape == (1, 16)


def test_dense_features_are_patch_token_maps(images):
    vit = _vit()
    assert vit.out_indices == (2, 5, 8, 11)  # four evenly spaced blocks, the last one included
    assert vit.feature_channels == [192] * 4 and vit.feature_reductions == [16] * 4
    with torch.no_grad():
        maps = vit.dense_features(images)
        tokens = vit.model.forward_features(images)
    assert [tuple(m.shape) for m in maps] == [(3, 192, IMG // 16, IMG // 16)] * 4
    expected = tokens[:, 1:].reshape(3, IMG // 16, IMG // 16, 192).permute(0, 3, 1, 2)
    assert torch.allclose(maps[-1], expected, atol=1e-5)
    # an earlier level is that block's output, normalised by the final norm
    x = vit.model.patch_embed(images)
    x = vit.model.norm_pre(vit.model._pos_embed(x))
    for block in vit.model.blocks[:3]:
        x = block(x)
    level0 = vit.model.norm(x)[:, 1:].reshape(3, 4, 4, 192).permute(0, 3, 1, 2)
    assert torch.allclose(maps[0], level0, atol=1e-5)
    # dynamic image size: any multiple of the patch
    dyn = create_backbone("vit_tiny_patch16_224", img_size=IMG, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert dyn.dense_features(torch.randn(1, 3, 32, 48))[-1].shape == (1, 192, 2, 3)


def test_fixed_size_vit_says_how_to_fix_the_image_size():
    with pytest.raises(ValueError, match=r"data.image_size=64.*dynamic_img_size"):
        _vit()(torch.zeros(1, 3, 32, 32))


def _separable_episode(backbone_dim_images: int = IMG):
    """Two classes of images that differ in brightness: support 3 + 3, query 2 + 2."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 3, backbone_dim_images, backbone_dim_images, generator=g) * 0.1
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
    images = base + labels.view(-1, 1, 1, 1).float() * 2.0 - 1.0
    d = TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, ("dark", "bright"), "toy: brightness", "toy")
    return images[:6], labels[:6], images[6:], labels[6:], d


def test_protonet_on_frozen_vit_features_is_the_nearest_class_mean():
    from medmeta.learners import ProtoNet

    s_img, s_lab, q_img, _, d = _separable_episode()
    vit = _vit("avg")
    learner = ProtoNet(vit).eval()
    with torch.no_grad():
        logits = learner.adapt(s_img, s_lab, d)(q_img)
        fs, fq = vit(s_img), vit(q_img)
    protos = torch.stack([fs[s_lab == c].mean(0) for c in (0, 1)])
    expected = -torch.cdist(fq, protos) ** 2
    assert logits.shape == (4, 2)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-3)


def test_linear_probe_on_frozen_vit_features_fits_the_support_set():
    from medmeta.learners import LinearProbe

    s_img, s_lab, q_img, q_lab, d = _separable_episode()
    learner = LinearProbe(_vit("token+avg"), weight_decay=1e-4)
    with torch.no_grad():
        support_logits = learner.adapt(s_img, s_lab, d)(s_img)
        query_logits = learner.adapt(s_img, s_lab, d)(q_img)
    assert support_logits.shape == (6, 2) and query_logits.shape == (4, 2)
    assert torch.equal(support_logits.argmax(1), s_lab)


@pytest.mark.parametrize("head", ["prototype", "linear", "unet"])
def test_segmentation_heads_run_on_dense_vit_features(head):
    from medmeta.adapters.segmentation.heads import create_segmenter

    g = torch.Generator().manual_seed(0)
    s_img = torch.rand(2, 3, IMG, IMG, generator=g)
    masks = torch.zeros(2, IMG, IMG, dtype=torch.long)
    masks[:, 16:48, 16:48] = 1
    s_img[masks[:, None].expand_as(s_img) == 1] += 1.0
    kwargs = {"linear": {"steps": 5}, "unet": {"finetune_steps": 2, "image_channels": 3}}.get(head, {})
    seg = create_segmenter(head, _vit(), **kwargs)
    logits = seg.adapt(s_img, masks, 1)(s_img[:1])
    assert logits.shape == (1, 2, IMG, IMG)
    assert torch.isfinite(logits).all()


def test_trainable_blocks_freeze_all_but_the_last_blocks():
    vit = _vit(trainable_blocks=2)
    trainable = {n for n, p in vit.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.model.named_parameters() if n.startswith(("blocks.10.", "blocks.11.", "norm."))}
    vit.set_trainable_blocks(0)
    assert not any(p.requires_grad for p in vit.parameters())
    vit.set_trainable_blocks(None)
    assert all(p.requires_grad for p in vit.parameters())
    with pytest.raises(ConfigError, match=r"0\.\.12"):
        vit.set_trainable_blocks(13)


def test_partial_fine_tuning_changes_only_the_last_blocks_and_keeps_frozen_batchnorm_statistics():
    from medmeta.learners import FineTune

    torch.manual_seed(0)
    cnn = create_backbone("resnet10t", trainable_blocks=1)  # layer4 (and nothing after it) trains
    s_img, s_lab, _, _, d = _separable_episode(32)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    net = FineTune(cnn, steps=3, lr=1e-2).fine_tune(s_img, s_lab, d)
    after = net[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layer4.") for k in changed), sorted(changed)[:5]
    # frozen BatchNorm layers stayed in eval mode: their running statistics did not move
    assert torch.equal(before["model.layer1.0.bn1.running_mean"], after["model.layer1.0.bn1.running_mean"])
    assert not torch.equal(before["model.layer4.0.bn1.running_mean"], after["model.layer4.0.bn1.running_mean"])


@pytest.mark.parametrize(
    "preset, normalize",
    [
        ("vit_small_patch14_dinov2", "imagenet"),
        ("vit_base_patch16_clip_224", "clip"),
        ("vit_base_patch16_siglip_224", "official"),
        ("convnext_tiny", "imagenet"),
    ],
)
def test_presets_name_timm_weights_and_their_normalisation(preset, normalize):
    from medmeta.backbones.pretrained import timm_pretrained_cfg, timm_weights_name
    from medmeta.training.components import resolve_normalize

    cfg = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    assert cfg["defaults"][0] == "backbone_schema"
    weights = timm_weights_name(cfg["name"], "timm")
    assert weights == cfg["name"]  # the preset pins a tag
    assert cfg["image_size"] == timm_pretrained_cfg(weights)["input_size"][-1] or preset.endswith("dinov2")
    assert resolve_normalize("auto", {**cfg, "pretrained": "timm"}) == normalize


def test_hydra_backbone_preset_composes_with_pool_and_trainable_blocks():
    from hydra import compose, initialize_config_dir

    from medmeta.config import register_configs
    from medmeta.training.components import build_backbone

    register_configs()
    with initialize_config_dir(str(CONF.parent), version_base="1.3"):
        cfg = compose(
            "train", overrides=["backbone=vit_small_patch14_dinov2", "backbone.pool=avg", "backbone.trainable_blocks=1"]
        ).backbone
    assert cfg.pool == "avg" and cfg.trainable_blocks == 1 and cfg.timm_kwargs.dynamic_img_size is True
    small = {**dict(cfg), "name": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": 32}}
    backbone = build_backbone(small)
    assert backbone.pool == "avg" and backbone.trainable_blocks == 1
