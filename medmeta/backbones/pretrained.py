"""Offline pretrained weights: a local file, or a named source that an installed package ships."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medmeta.backbones.timm_backbone import Backbone

__all__ = ["resolve_pretrained"]


def resolve_pretrained(source: str, backbone: "Backbone") -> None:
    """Load ``source`` (a local path) into ``backbone``."""
    path = Path(source).expanduser()
    if path.is_file():
        backbone.load_weights(path)
        return
    raise ValueError(f"pretrained: {source!r} is neither an existing weights file nor a known named source")
