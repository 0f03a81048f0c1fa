"""Any timm model as a feature extractor: pooled features, dense multi-scale features.

Weights (``pretrained`` of :func:`create_backbone`):

* ``None`` / ``False``: random initialisation;
* ``True``, ``"timm"``, ``"timm:<tag>"``, ``"timm:<model>.<tag>"``: timm's own weights, loaded
  by timm from the Hugging Face hub cache (downloaded only when the hub is reachable and
  ``HF_HUB_OFFLINE`` is unset; otherwise the error says which file to place where);
* a named offline source (:mod:`medmeta.backbones.pretrained`, e.g. ``imagenet-mobilenetv2``);
* a local weights file (``.safetensors``, or a torch file read with ``weights_only=True``):
  loaded through timm (``pretrained_cfg_overlay=dict(file=...)``, so timm's checkpoint
  conversion, input-channel adaptation and position-embedding resampling apply), else by
  medmeta's strict state-dict loader (:meth:`Backbone.load_weights`).

Foundation models (ViT, DINOv2, CLIP / SigLIP vision towers) are first-class: ``pool`` picks
the pooled feature (class token, mean of the patch tokens, or both), :meth:`Backbone.dense_features`
returns patch-token maps ``(B, C, H/p, W/p)`` for the segmentation heads, and
``trainable_blocks`` freezes all but the last blocks for partial fine-tuning.
:func:`list_backbones` lists the names :func:`create_backbone` takes: every timm model,
medmeta's own (``medmeta_conv4*``) included.
"""
from __future__ import annotations

import inspect
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import timm
import torch
from torch import Tensor, nn

from medmeta.backbones import conv4 as _conv4  # noqa: F401  (registers medmeta_conv4*)
from medmeta.backbones.pretrained import PretrainedArg
from medmeta.errors import CheckpointError, ConfigError, MissingDataError, UnknownNameError
from medmeta.io import load_torch_file

__all__ = ["Backbone", "POOLS", "create_backbone", "list_backbones", "load_state_dict_file"]

POOLS = ("token", "avg", "token+avg")
"""Pooled features of token models: the class token, the mean of the patch tokens (prefix
tokens such as registers excluded), or both concatenated (the DINOv2 linear-probe feature)."""

_log = logging.getLogger("medmeta.backbones")


def list_backbones(filter: str = "") -> list[str]:
    """Names :func:`create_backbone` accepts (timm's ``list_models``, medmeta's models included);
    ``filter`` is a wildcard pattern such as ``"resnet*"``."""
    names: list[str] = timm.list_models(filter)
    return names


def load_state_dict_file(path: "str | Path") -> dict[str, Tensor]:
    """Read a state dict safely (no pickle code): ``.safetensors``, or a torch file holding the
    tensors plainly or under ``state_dict`` / ``model`` / ``backbone``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MissingDataError(f"weights file {path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"weights file {path}: not a readable safetensors file ({err})") from err
    else:
        obj = load_torch_file(path, "weights file", error=CheckpointError)
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path}: expected a dict of tensors (a state dict)")
    return obj


# -- loading through timm ----------------------------------------------------------------------
class _TimmLoadLog(logging.Handler):
    """What timm's loader reported: whether it loaded, and the missing / unexpected keys."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def loaded(self) -> bool:
        return any(m.startswith("Loading pretrained weights") for m in self.messages)

    def keys(self, kind: str) -> list[str]:
        pattern = re.compile(rf"^{kind} keys \((.*)\) (?:discovered|found)", re.S)
        for message in self.messages:
            found = pattern.match(message)
            if found:
                return [k.strip() for k in found.group(1).split(",") if k.strip()]
        return []


@contextmanager
def _timm_load_log() -> Iterator[_TimmLoadLog]:
    """Capture timm's loader messages (not shown; medmeta reports what matters itself)."""
    logger = logging.getLogger("timm.models._builder")
    handler = _TimmLoadLog()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        errors += [hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, hf_errors.HfHubHTTPError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _file_errors() -> tuple[type[BaseException], ...]:
    """What timm's loading raises for weights it cannot use: shape mismatches and refused pickles
    (RuntimeError), unreadable files, models that take no pretrained weights (ValueError /
    TypeError), and the hub errors of :func:`_hub_errors`."""
    from safetensors import SafetensorError

    return (RuntimeError, ValueError, TypeError, SafetensorError, *_hub_errors())


def _create_timm_model(model_name: str, in_chans: int, weights: Optional[str], kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` without classifier; ``weights``: ``None`` (random), ``"hub"``
    (timm's weights of ``model_name``'s tag) or a local file given to timm as
    ``pretrained_cfg_overlay=dict(file=...)``. Loading is checked: weights timm did not load,
    keys the model misses or tensors of the wrong shape are a :class:`CheckpointError`."""
    if weights is None:
        model: nn.Module = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        return model
    extra: dict[str, Any] = {}
    where = f"timm weights {model_name}"
    if weights != "hub":
        extra["pretrained_cfg_overlay"] = {**dict(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": weights, "source": None}
        where = f"weights file {weights}"
    with _timm_load_log() as log:
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0, in_chans=in_chans, **extra, **kwargs)
        except _file_errors() as err:
            if weights == "hub" and not isinstance(err, _hub_errors()):
                raise CheckpointError(f"{where} do not fit timm model {model_name}: {str(err)[:1500]}") from err
            if weights != "hub":
                raise CheckpointError(f"{where}: timm cannot load it into {model_name} ({type(err).__name__}: {str(err)[:1500]})") from err
            from medmeta.backbones.pretrained import hub_cache_hint

            raise MissingDataError(
                f"backbone {model_name}: timm's weights are not in the local Hugging Face hub cache and the hub "
                f"cannot be reached ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                f"{hub_cache_hint(model_name, kwargs.get('cache_dir'))}"
            ) from None
    if not log.loaded:
        raise CheckpointError(f"{where}: timm did not load it into {model_name} (the model ignores timm's pretrained loading)")
    missing = log.keys("Missing")
    if missing:
        raise CheckpointError(
            f"{where} does not fit timm model {model_name}: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)} tensors)"
        )
    unexpected = log.keys("Unexpected")
    if unexpected:
        _log.warning("%s: %d tensors not used by %s: %s", where, len(unexpected), model_name, unexpected[:5])
    return model


class Backbone(nn.Module):
    """A timm model wrapped as a feature extractor.

    ``forward(x)`` returns pooled features ``(B, num_features)``: the model's own pooling, or for
    token models (ViT, DINOv2, CLIP, SigLIP) the ``pool`` of :data:`POOLS` computed from the final
    normalised tokens of ``forward_features``. ``dense_features(x)`` returns the feature maps named
    by ``out_indices`` (strides in ``feature_reductions``, channels in ``feature_channels``); for
    token models these are patch-token maps ``(B, C, H/p, W/p)`` after the final norm, by default
    of four evenly spaced blocks ending with the last. Grayscale input is repeated to the model's
    channel count when ``in_chans`` is 3; pass ``in_chans=1`` to build a one-channel stem instead.
    ``pretrained_cfg`` is timm's description of the weights (``mean``, ``std``, ``input_size``);
    :attr:`normalization` the matching ``data.normalize`` value.

    Args:
        name: a timm model name, optionally with a pretrained tag (``model.tag``).
        in_chans: input channels of the stem.
        out_indices: feature levels of :meth:`dense_features` (positions in timm's ``feature_info``).
        pool: ``None`` (the model's own), or one of :data:`POOLS` for token models (``"avg"`` is
            also accepted for CNNs, whose own pooling is the average).
        timm_weights: ``None`` (random), ``"hub"`` (timm's weights of the tag in ``name``) or a
            local file for timm's loader; :func:`create_backbone` chooses it from ``pretrained``.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size`` ...).
    """

    def __init__(
        self,
        name: str,
        in_chans: int = 3,
        out_indices: Optional[Sequence[int]] = None,
        pool: Optional[str] = None,
        *,
        timm_weights: Optional[str] = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        arch, _, tag = str(name).partition(".")
        if arch not in list_backbones():
            raise UnknownNameError(
                f"backbone: unknown timm model {arch!r}; see medmeta.list_backbones() "
                f"(e.g. resnet18, mobilenetv2_100, vit_small_patch14_dinov2, medmeta_conv4)"
            )
        if pool is not None and pool not in POOLS:
            raise ConfigError(f"backbone.pool: expected null (the model's own) or one of {POOLS}, got {pool!r}")
        self.name = arch
        self.tag = tag or None
        self.in_chans = in_chans
        self.model: nn.Module = _create_timm_model(str(name), in_chans, timm_weights, dict(timm_kwargs))
        self.pretrained_cfg: dict[str, Any] = dict(getattr(self.model, "pretrained_cfg", None) or {})
        self.is_token_model = _is_token_model(self.model)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0)) if self.is_token_model else 0
        width = int(getattr(self.model, "num_features"))
        if pool in ("token", "token+avg") and not (self.is_token_model and _has_class_token(self.model)):
            raise ConfigError(
                f"backbone.pool={pool}: {arch} has no class token (token models with one: ViT, DINOv2, CLIP); "
                f"use pool=avg or null"
            )
        self.pool = pool
        self.num_features: int = 2 * width if pool == "token+avg" else width
        info: Any = getattr(self.model, "feature_info")
        if hasattr(info, "info"):
            info = info.info
        self._feature_modules = [str(i.get("module", "")) for i in info]
        n_stages = len(info)
        if out_indices is None:
            depth = n_stages
            default = sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}) if self.is_token_model else range(n_stages)
            self.out_indices = tuple(default)
        else:
            self.out_indices = tuple(i % n_stages for i in out_indices)
        self.feature_channels = [int(info[i]["num_chs"]) for i in self.out_indices]
        self.feature_reductions = [int(info[i]["reduction"]) for i in self.out_indices]
        self.trainable_blocks: Optional[int] = None

    # -- weights and normalisation -------------------------------------------------------------
    @property
    def normalization(self) -> Optional[str]:
        """The ``normalize`` value (:mod:`medmeta.data.transforms`) of the weights' mean/std, or
        ``None`` when timm describes no weights for this model."""
        from medmeta.data.transforms import normalization_spec

        mean, std = self.pretrained_cfg.get("mean"), self.pretrained_cfg.get("std")
        if not self.pretrained_cfg.get("architecture") or mean is None or std is None:
            return None
        return normalization_spec(mean, std)

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        """``(H, W)`` the weights were trained at (timm's ``pretrained_cfg``), if known."""
        size = self.pretrained_cfg.get("input_size") if self.pretrained_cfg.get("architecture") else None
        return None if not size else (int(size[-2]), int(size[-1]))

    # -- features ------------------------------------------------------------------------------
    def _match_channels(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"backbone {self.name}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        patch_embed = getattr(self.model, "patch_embed", None)
        fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
        if fixed is not None and tuple(x.shape[-2:]) != tuple(fixed):
            raise ValueError(
                f"backbone {self.name}: built for {tuple(fixed)} images, got {tuple(x.shape[-2:])}; resize the "
                f"images (data.image_size={fixed[0]}) or build it with timm_kwargs img_size=... or dynamic_img_size=true"
            )
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
        x = self._match_channels(x)
        if self.pool is None or not self.is_token_model:
            features: Tensor = self.model(x)
            return features
        forward_features: Any = getattr(self.model, "forward_features")
        tokens: Tensor = forward_features(x)
        if self.pool == "token":
            return tokens[:, 0]
        mean = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return mean if self.pool == "avg" else torch.cat([tokens[:, 0], mean], dim=1)

    def dense_features(self, x: Tensor) -> list[Tensor]:
        """Feature maps at the configured ``out_indices`` (NCHW), shallow to deep; for token
        models the patch tokens of those blocks, final norm applied, as ``(B, C, H/p, W/p)``."""
        forward_intermediates: Any = getattr(self.model, "forward_intermediates")
        kwargs: dict[str, Any] = {"indices": list(self.out_indices), "intermediates_only": True}
        if self.is_token_model and "norm" in inspect.signature(forward_intermediates).parameters:
            kwargs["norm"] = True
        return list(forward_intermediates(self._match_channels(x), **kwargs))

    # -- partial fine-tuning -------------------------------------------------------------------
    def set_trainable_blocks(self, blocks: Optional[int]) -> None:
        """Freeze all but the last ``blocks`` blocks (``requires_grad=False``), for partial
        fine-tuning: ``None`` trains everything, ``0`` freezes everything, ``k >= 1`` trains the
        last ``k`` of timm's ``feature_info`` blocks (ViT blocks, ResNet layers, ConvNeXt
        stages) and every parameter after them (final norm, attention pool). Frozen BatchNorm
        layers then stay in eval mode in ``train()`` so their running statistics do not move."""
        params = list(self.model.named_parameters())
        if blocks is None:
            for _, p in params:
                p.requires_grad_(True)
            self.trainable_blocks = None
            return
        n = len(self._feature_modules)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= n:
            raise ConfigError(f"backbone.trainable_blocks: expected null or 0..{n} (blocks of {self.name}), got {blocks!r}")
        trainable: set[str] = set()
        if blocks > 0:
            chosen = self._feature_modules[n - blocks:]
            names = [name for name, _ in params]
            trainable = {name for name in names if any(name.startswith(m + ".") for m in chosen)}
            last = max((i for i, name in enumerate(names) if name.startswith(self._feature_modules[-1] + ".")), default=-1)
            trainable |= set(names[last + 1:])
        for name, p in params:
            p.requires_grad_(name in trainable)
        self.trainable_blocks = blocks
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode and self.trainable_blocks is not None:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

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


def _is_token_model(model: nn.Module) -> bool:
    """A transformer whose ``forward_features`` returns tokens ``(B, N, C)`` (ViT family)."""
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks") and hasattr(model, "patch_embed")


def _has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def create_backbone(
    name: str,
    pretrained: PretrainedArg = None,
    in_chans: int = 3,
    out_indices: Optional[Sequence[int]] = None,
    pool: Optional[str] = None,
    trainable_blocks: Optional[int] = None,
    **timm_kwargs: Any,
) -> Backbone:
    """Create a backbone (see the module doc for ``pretrained``).

    Args:
        name: a timm model (``list_backbones()``), optionally ``model.tag``.
        pretrained: ``None``/``False``, ``True``/``"timm"``/``"timm:<tag>"``, a named offline
            source, or a local weights file.
        in_chans: stem channels (timm adapts pretrained stems to 1 channel by summing).
        out_indices: levels of :meth:`Backbone.dense_features`.
        pool: pooled feature of token models (:data:`POOLS`; ``None``: the model's own).
        trainable_blocks: ``None`` (all), or train only the last ``k`` blocks
            (:meth:`Backbone.set_trainable_blocks`).
        **timm_kwargs: for ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``cache_dir`` ...).
    """
    from medmeta.backbones.pretrained import (
        SOURCES,
        is_timm_pretrained,
        normalize_pretrained,
        resolve_pretrained,
        timm_weights_name,
    )

    common: dict[str, Any] = {"in_chans": in_chans, "out_indices": out_indices, "pool": pool, **timm_kwargs}
    pretrained = normalize_pretrained(pretrained)
    if is_timm_pretrained(pretrained):
        backbone = Backbone(timm_weights_name(name, pretrained), timm_weights="hub", **common)
    elif not pretrained:
        backbone = Backbone(name, **common)
    elif str(pretrained) in SOURCES:
        backbone = Backbone(name, **common)
        resolve_pretrained(str(pretrained), backbone)
    else:
        path = Path(str(pretrained)).expanduser()
        if not path.is_file():
            from medmeta.backbones.pretrained import list_pretrained_sources

            raise ConfigError(
                f"pretrained: {pretrained!r} is neither an existing weights file nor a known named source "
                f"{list_pretrained_sources()} nor timm's weights (true, 'timm' or 'timm:<tag>')"
            )
        try:
            backbone = Backbone(name, timm_weights=str(path), **common)
        except CheckpointError as timm_error:
            backbone = Backbone(name, **common)
            try:
                backbone.load_weights(path)
            except CheckpointError as err:
                raise CheckpointError(f"{err}. Through timm's loader: {timm_error}") from err
    backbone.set_trainable_blocks(trainable_blocks)
    return backbone
