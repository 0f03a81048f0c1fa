"""Backbones: timm models as feature extractors, with offline weights."""
from medmeta.backbones.timm_backbone import Backbone, create_backbone, load_state_dict_file

__all__ = ["Backbone", "create_backbone", "load_state_dict_file"]
