"""Backbones: timm models as feature extractors, with offline weights.

``create_backbone(name, pretrained=...)`` builds one; ``list_backbones()`` lists the names;
``pretrained`` is timm's weights (``True``, ``"timm"``, ``"timm:<tag>"``; through the Hugging Face
hub cache), a local weights file, or a named offline source (``list_pretrained_sources()``,
:func:`register_pretrained_source` adds one). Foundation models (ViT, DINOv2, CLIP, SigLIP) pool
by ``pool`` (:data:`POOLS`) and give patch-token maps as dense features; ``trainable_blocks``
freezes all but the last blocks. Guide: docs/backbones.md.
"""
from medmeta.backbones.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    PretrainedSource,
    get_pretrained_source,
    hub_cache_hint,
    is_timm_pretrained,
    list_pretrained_sources,
    load_pretrained_into,
    pretrained_normalization,
    pretrained_state_dict,
    register_pretrained_source,
    resolve_pretrained,
    source_weights_file,
    timm_pretrained_cfg,
    timm_weights_name,
)
from medmeta.backbones.timm_backbone import POOLS, Backbone, create_backbone, list_backbones, load_state_dict_file

__all__ = [
    "Backbone",
    "POOLS",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
    "PretrainedSource",
    "SOURCES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "list_pretrained_sources",
    "get_pretrained_source",
    "register_pretrained_source",
    "pretrained_normalization",
    "source_weights_file",
    "pretrained_state_dict",
    "load_pretrained_into",
    "resolve_pretrained",
    "is_timm_pretrained",
    "timm_weights_name",
    "timm_pretrained_cfg",
    "hub_cache_hint",
]
