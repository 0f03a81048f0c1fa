"""Backbones: timm models as feature extractors, with offline weights.

``create_backbone(name, pretrained=...)`` builds one; ``list_backbones()`` lists the names;
``pretrained`` is a local weights file or a named offline source (``list_pretrained_sources()``,
:func:`register_pretrained_source` adds one).
"""
from medmeta.backbones.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    PretrainedSource,
    get_pretrained_source,
    list_pretrained_sources,
    load_pretrained_into,
    pretrained_normalization,
    pretrained_state_dict,
    register_pretrained_source,
    resolve_pretrained,
    source_weights_file,
)
from medmeta.backbones.timm_backbone import Backbone, create_backbone, list_backbones, load_state_dict_file

__all__ = [
    "Backbone",
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
]
