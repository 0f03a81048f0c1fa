"""Any timm model as a feature extractor: pooled features, dense multi-scale features.

The backbone never reaches a hub: weights come from a local file (read by
:func:`medmeta.io.load_torch_file`, ``weights_only=True``) or from a named offline source
registered in :mod:`medmeta.backbones.pretrained`. :func:`list_backbones` lists the names
:func:`create_backbone` takes: every timm model, medmeta's own (``medmeta_conv4*``) included.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import timm
from torch import Tensor, nn

from medmeta.backbones import conv4 as _conv4  # noqa: F401  (registers medmeta_conv4*)
from medmeta.errors import CheckpointError, UnknownNameError
from medmeta.io import load_torch_file

__all__ = ["Backbone", "create_backbone", "list_backbones", "load_state_dict_file"]


def list_backbones(filter: str = "") -> list[str]:
    """Names :func:`create_backbone` accepts (timm's ``list_models``, medmeta's models included);
    ``filter`` is a wildcard pattern such as ``"resnet*"``."""
    names: list[str] = timm.list_models(filter)
    return names


def load_state_dict_file(path: "str | Path") -> dict[str, Tensor]:
    """Read a state dict safely (no pickle code): plain, or under ``state_dict`` / ``model``."""
    obj = load_torch_file(path, "weights file", error=CheckpointError)
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path}: expected a dict of tensors (a state dict)")
    return obj


class Backbone(nn.Module):
    """A timm model wrapped as a feature extractor.

    ``forward(x)`` returns globally pooled features ``(B, num_features)``;
    ``dense_features(x)`` returns the feature maps named by ``out_indices`` (strides in
    ``feature_reductions``, channels in ``feature_channels``). Grayscale input is repeated to
    the model's channel count when ``in_chans`` is 3; pass ``in_chans=1`` to build a
    one-channel stem instead.
    """

    def __init__(
        self,
        name: str,
        in_chans: int = 3,
        out_indices: Optional[Sequence[int]] = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if name not in list_backbones():
            raise UnknownNameError(
                f"backbone: unknown timm model {name!r}; see medmeta.list_backbones() "
                f"(e.g. resnet18, mobilenetv2_100, medmeta_conv4)"
            )
        self.name = name
        self.in_chans = in_chans
        self.model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs
        )
        self.num_features: int = int(getattr(self.model, "num_features"))
        info: Any = getattr(self.model, "feature_info")
        if hasattr(info, "info"):
            info = info.info
        n_stages = len(info)
        self.out_indices = tuple(range(n_stages)) if out_indices is None else tuple(i % n_stages for i in out_indices)
        self.feature_channels = [int(info[i]["num_chs"]) for i in self.out_indices]
        self.feature_reductions = [int(info[i]["reduction"]) for i in self.out_indices]

    def _match_channels(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"backbone {self.name}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c == self.in_chans:
            return x
        if c == 1 and self.in_chans == 3:
            return x.expand(-1, 3, -1, -1)
        raise ValueError(
            f"backbone {self.name}: images have {c} channels, the model takes {self.in_chans} "
            f"(only 1 -> 3 channel repetition is done automatically)"
        )

    def forward(self, x: Tensor) -> Tensor:
        features: Tensor = self.model(self._match_channels(x))
        return features

    def dense_features(self, x: Tensor) -> list[Tensor]:
        """Feature maps at the configured ``out_indices`` (NCHW), shallow to deep."""
        forward_intermediates: Any = getattr(self.model, "forward_intermediates")
        return list(
            forward_intermediates(self._match_channels(x), indices=list(self.out_indices), intermediates_only=True)
        )

    def load_weights(self, path: "str | Path", strict: bool = True) -> None:
        """Load a local state dict; a mismatch names the missing, unexpected and resized keys."""
        state = load_state_dict_file(path)
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        own = self.model.state_dict()
        resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and not k.startswith(("fc.", "classifier.", "head."))]
        if resized or (strict and (missing or unexpected)):
            raise CheckpointError(
                f"weights file {path} does not fit backbone {self.name}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in resized[:5]]}"
            )
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def create_backbone(
    name: str,
    pretrained: Optional[str] = None,
    in_chans: int = 3,
    out_indices: Optional[Sequence[int]] = None,
    **timm_kwargs: Any,
) -> Backbone:
    """Create a backbone; ``pretrained`` is a local weights path or a named offline source."""
    backbone = Backbone(name, in_chans=in_chans, out_indices=out_indices, **timm_kwargs)
    if pretrained:
        from medmeta.backbones.pretrained import resolve_pretrained

        resolve_pretrained(pretrained, backbone)
    return backbone
