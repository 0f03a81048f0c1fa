"""Build the pieces of an experiment from its config groups, validating everything at startup.

Each function turns one config group into library objects (data settings and meta-dataset,
backbone, learner, samplers, optimiser, scheduler, protocol) and raises a
:class:`~medmeta.errors.ConfigError` that names the config option and what was expected *before*
any long work starts: a missing data root, a learner argument the learner does not take.
Task selection lives in :func:`medmeta.data.meta_dataset.plan_tasks`; result tables in
:mod:`medmeta.evaluation.reports`. Scripts can call these directly; the Hydra apps
(:mod:`medmeta.training.run`) only wire them together.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from medmeta.errors import ConfigError

__all__ = [
    "to_plain",
    "weights_preprocessing",
    "resolve_normalize",
    "resolve_image_size",
    "resolve_data_config",
    "open_meta_dataset",
    "build_backbone",
    "build_learner",
    "learner_name",
    "learner_class",
    "build_train_sampler",
    "build_val_sampler",
    "build_optimizer",
    "build_scheduler",
    "build_protocol",
    "EMBEDDED_DATA",
]

EMBEDDED_DATA = {"synthetic": "synthetic", "real_mini": "real"}
"""Config name of an embedded data set -> its name in :mod:`medmeta.recipes.embedded`."""


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node as plain Python containers (resolved); other values unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping) or isinstance(cfg, DictConfig):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# data ---------------------------------------------------------------------------------------
def _split_backbone(pretrained: Any, backbone: Optional[str]) -> tuple[Any, Optional[str]]:
    """``(backbone.pretrained, backbone name)`` from the whole ``backbone`` config or just ``pretrained``."""
    if isinstance(pretrained, (Mapping, DictConfig)):
        backbone = backbone or (None if _get(pretrained, "name") is None else str(_get(pretrained, "name")))
        pretrained = _get(pretrained, "pretrained")
    return pretrained, backbone


def weights_preprocessing(pretrained: Any, backbone: Optional[str] = None, option: str = "data.normalize") -> Optional[dict[str, Any]]:
    """How the chosen weights want their images: ``{"mean", "std", "input_size"}`` (each possibly
    absent), or ``None`` for random initialisation.

    A named offline source gives its own statistics and input size; timm's weights
    (``pretrained=timm``, ``timm:<tag>``) their ``pretrained_cfg``; a local weights file the
    ``pretrained_cfg`` of the timm model's default weights (empty when timm has none or
    ``backbone`` is not given). ``pretrained`` is ``backbone.pretrained`` or the whole ``backbone``
    config (its ``name`` then serves as ``backbone``); ``option`` names the setting in errors.
    """
    from medmeta.backbones.pretrained import (
        get_pretrained_source,
        is_timm_pretrained,
        list_pretrained_sources,
        normalize_pretrained,
        timm_pretrained_cfg,
        timm_weights_name,
    )

    pretrained, backbone = _split_backbone(pretrained, backbone)
    pretrained = normalize_pretrained(pretrained)
    if not pretrained:
        return None
    if is_timm_pretrained(pretrained):
        text = str(pretrained)
        if backbone is None and not (text.startswith("timm:") and "." in text):
            raise ConfigError(
                f"{option}=auto with backbone.pretrained={pretrained}: the backbone name is needed to read the "
                f"weights' preprocessing (pass the backbone config to resolve_data_config), or set {option}"
            )
        return timm_pretrained_cfg(timm_weights_name(backbone or text[len("timm:"):].partition(".")[0], pretrained)) or {}
    if str(pretrained) in list_pretrained_sources():
        spec = get_pretrained_source(str(pretrained))
        return {"mean": tuple(spec.mean), "std": tuple(spec.std), "input_size": (3, spec.input_size, spec.input_size)}
    return (timm_pretrained_cfg(backbone) if backbone else None) or {}


def resolve_normalize(normalize: Optional[str], pretrained: Any, backbone: Optional[str] = None) -> Optional[str]:
    """The image normalisation a run uses: ``auto`` follows the backbone's weights.

    ``auto``: the mean/std of the chosen weights (:func:`weights_preprocessing`; a
    :data:`~medmeta.data.transforms.NORMALIZATIONS` name or ``"mean=...;std=..."``), ``imagenet``
    when they record none, and the official MedIMeta loader's ``official`` (mean = std = 0.5) for
    random initialisation. Anything else (a name, an explicit ``"mean=R,G,B;std=R,G,B"``,
    ``None``) is the user's override.
    """
    if normalize is None or str(normalize) != "auto":
        return None if normalize is None else str(normalize)
    from medmeta.data.transforms import normalization_spec

    cfg = weights_preprocessing(pretrained, backbone)
    if cfg is None:
        return "official"
    return normalization_spec(cfg["mean"], cfg["std"]) if cfg.get("mean") and cfg.get("std") else "imagenet"


def resolve_image_size(image_size: Any, pretrained: Any, backbone: Optional[str] = None) -> Optional[int]:
    """The image size a run reads at: ``null`` the stored size, an int that size, and ``auto`` the
    input size of the chosen weights (:func:`weights_preprocessing`; e.g. 224 for ImageNet
    MobileNetV2, 518 for DINOv2 ViTs), or the stored size for random initialisation and weights
    that record none."""
    if image_size is None:
        return None
    if str(image_size) == "auto":
        cfg = weights_preprocessing(pretrained, backbone, option="data.image_size") or {}
        size = cfg.get("input_size")
        return int(size[-1]) if size else None
    try:
        value = int(image_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(value) != str(image_size).strip():
        raise ConfigError(f"data.image_size: expected null (as stored), auto (the weights' input size) or a positive "
                          f"size, got {image_size!r}")
    return value


def resolve_data_config(data_cfg: Any, pretrained: Any = None) -> DictConfig:
    """The ``data`` config with every image setting checked and ``normalize=auto`` and
    ``image_size=auto`` resolved against ``pretrained`` (the ``backbone`` config, or just ``backbone.pretrained``; see
    :func:`resolve_normalize`): what the run reads its images with, computed once and used for the
    meta-dataset and the checkpoint fingerprint alike."""
    data = OmegaConf.create(to_plain(data_cfg) if OmegaConf.is_config(data_cfg) else dict(_plain_mapping(data_cfg)))
    channels = data.get("channels")
    if channels is not None and int(channels) not in (1, 3):
        raise ConfigError(f"data.channels: expected null (as stored), 1 or 3, got {channels}")
    normalize = resolve_normalize(data.get("normalize", "auto"), pretrained)
    from medmeta.data.transforms import NORMALIZATIONS, check_normalize

    try:
        check_normalize(normalize)
    except ValueError:
        raise ConfigError(
            f"data.normalize: expected auto, null, one of {sorted(NORMALIZATIONS)} or 'mean=R,G,B;std=R,G,B', "
            f"got {normalize!r}"
        ) from None
    data.image_size = resolve_image_size(data.get("image_size"), pretrained)
    data.normalize = normalize
    return data


def _plain_mapping(cfg: Any) -> Mapping[str, Any]:
    if isinstance(cfg, Mapping):
        return cfg
    from dataclasses import asdict, is_dataclass

    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    return dict(vars(cfg))


def open_meta_dataset(data_cfg: Any, pretrained: Any = None) -> Any:
    """The meta-dataset a ``data`` config names (embedded copy, or a MedIMeta-format folder).

    ``data.channels`` / ``data.normalize`` / ``data.image_size`` set how every task reads its
    images (:func:`resolve_data_config`; ``pretrained`` resolves ``normalize=auto``).
    """
    name = str(_get(data_cfg, "name"))
    if OmegaConf.is_config(data_cfg) and OmegaConf.is_missing(data_cfg, "root"):
        root = None
    else:
        root = _get(data_cfg, "root")
    if root is None and name not in EMBEDDED_DATA:
        raise ConfigError(
            f"data.root is required for data={name}: pass data.root=/path/to/medimeta (a folder with one "
            f"sub-folder per dataset, each holding info.yaml); embedded data sets that need no root are "
            f"{sorted(EMBEDDED_DATA)}"
        )
    data = resolve_data_config(data_cfg, pretrained)
    from medmeta.data.meta_dataset import MetaDataset

    if root is None:
        from medmeta.recipes import open_default

        try:
            path = Path(open_default(EMBEDDED_DATA[name]).root)
        except (OSError, ValueError, ImportError) as err:
            raise ConfigError(f"data={name}: the embedded meta-dataset could not be built or opened: {err}") from err
    else:
        path = Path(str(root)).expanduser()
        if not path.exists():
            raise ConfigError(f"data.root={root}: the folder does not exist (expected a MedIMeta-format data root)")
        if not path.is_dir():
            raise ConfigError(f"data.root={root}: not a folder (expected a MedIMeta-format data root)")
    channels, image_size = data.get("channels"), data.get("image_size")
    try:
        meta = MetaDataset(
            path,
            channels=None if channels is None else int(channels),
            normalize=data.normalize,
            image_size=None if image_size is None else int(image_size),
        )
        if not list(meta.tasks):
            raise ValueError("no dataset with an info.yaml was found")
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"data.root={path}: cannot be read as a MedIMeta-format meta-dataset: {err}") from err
    return meta


# models ----------------------------------------------------------------------------------------
def build_backbone(backbone_cfg: Any) -> nn.Module:
    """:func:`medmeta.backbones.create_backbone` from a ``backbone`` config.

    The returned module carries ``weights_origin`` (``"random"``, the named source, the weights
    file, ``"timm:<model>.<tag>"`` for timm's weights, or ``"random (fallback: ...)"``) so that
    runs can record what they started from. With ``if_unavailable=random`` a named offline source
    whose package is not installed, or timm weights that are neither in the hub cache nor
    downloadable, are replaced by random initialisation, with a warning that says what to do.
    ``pool`` and ``trainable_blocks`` are passed on (pooled feature of token models; partial
    fine-tuning).
    """
    import logging
    import warnings

    from medmeta.backbones import create_backbone
    from medmeta.backbones.pretrained import is_timm_pretrained, normalize_pretrained, timm_weights_name

    name = str(_get(backbone_cfg, "name"))
    pretrained = normalize_pretrained(_get(backbone_cfg, "pretrained"))
    policy = str(_get(backbone_cfg, "if_unavailable", "error") or "error")
    if policy not in ("error", "random"):
        raise ConfigError(f"backbone.if_unavailable: expected error or random, got {policy!r}")
    kwargs = dict(to_plain(_get(backbone_cfg, "timm_kwargs")) or {})
    kwargs["in_chans"] = int(_get(backbone_cfg, "in_chans", 3))
    pool = _get(backbone_cfg, "pool")
    kwargs["pool"] = None if pool is None else str(pool)
    blocks = _get(backbone_cfg, "trainable_blocks")
    kwargs["trainable_blocks"] = None if blocks is None else int(blocks)
    hub = is_timm_pretrained(pretrained)
    origin = "random" if not pretrained else str(pretrained)
    try:
        if hub:
            origin = f"timm:{timm_weights_name(name, pretrained)}"
        backbone = create_backbone(name, pretrained=pretrained, **kwargs)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        # a named source whose package is not installed, or timm weights not in the hub cache
        unavailable = isinstance(err, ModuleNotFoundError) or hub
        if not unavailable:
            raise ConfigError(f"backbone.pretrained={pretrained}: {err}") from err
        if policy != "random":
            raise ConfigError(
                f"backbone.pretrained={pretrained}: {err}; or set backbone.if_unavailable=random to continue "
                f"from random initialisation"
            ) from err
        message = (
            f"backbone.pretrained={pretrained} is not available ({err}). FALLING BACK to a randomly initialised "
            f"{name}: results will be far below those of pretrained weights."
        )
        warnings.warn(message, stacklevel=2)
        logging.getLogger("medmeta.training").warning(message)
        try:
            backbone = create_backbone(name, pretrained=None, **kwargs)
        except (ValueError, TypeError) as err2:
            raise ConfigError(f"backbone (name={name}): {err2}") from err2
        origin = f"random (fallback: {pretrained} not {'in the hub cache' if hub else 'installed'})"
    except (ValueError, TypeError) as err:
        raise ConfigError(f"backbone (name={name}, pretrained={pretrained}): {err}") from err
    setattr(backbone, "weights_origin", origin)  # recorded by the runs (see docstring)
    return backbone


def learner_name(learner_cfg: Any) -> str:
    """The registry name of a learner config (``name`` normalised: ``Proto-MAML`` -> ``proto_maml``)."""
    from medmeta.registry import normalize_name

    return normalize_name(str(_get(learner_cfg, "name")))


def learner_class(learner_cfg: Any, where: str = "learner") -> Any:
    """The registered class (or factory) of a learner config; an unknown name lists the known ones."""
    from medmeta.learners.registry import LEARNERS

    name = learner_name(learner_cfg)
    if name not in LEARNERS:
        raise ConfigError(f"{where}.name: unknown learner {name!r}; known learners: {LEARNERS.names()}")
    return LEARNERS.get(name)


def build_learner(learner_cfg: Any, backbone: nn.Module, tasks: Optional[Sequence[Any]] = None, where: str = "learner") -> Any:
    """:func:`medmeta.learners.create_learner` from a learner config; ``tasks`` (task
    descriptions) are passed to learners whose constructor takes them (mm-PT)."""
    import inspect

    from medmeta.config import learner_kwargs
    from medmeta.learners import create_learner

    name = learner_name(learner_cfg)
    factory = learner_class(learner_cfg, where)
    kwargs = learner_kwargs(learner_cfg)
    if "tasks" in inspect.signature(factory).parameters:
        if tasks is None:
            raise ConfigError(f"{where}={name} needs the training tasks (it is trained by experiments/train.py)")
        kwargs["tasks"] = list(tasks)
    try:
        return create_learner(name, backbone, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} (name={name}): {err}") from err


# episodes -------------------------------------------------------------------------------------
def _sampler_kwargs(sampler_cfg: Any) -> dict[str, Any]:
    mode = str(_get(sampler_cfg, "mode"))
    common = {
        "weighting": str(_get(sampler_cfg, "weighting")),
        "temperature": float(_get(sampler_cfg, "temperature")),
        "n_query": int(_get(sampler_cfg, "n_query")),
        "on_insufficient": str(_get(sampler_cfg, "on_insufficient")),
    }
    if mode == "fixed":
        n_way = _get(sampler_cfg, "n_way")
        return {**common, "n_way": None if n_way is None else int(n_way), "n_shot": int(_get(sampler_cfg, "n_shot"))}
    if mode == "variable":
        way = list(to_plain(_get(sampler_cfg, "way_range")))
        shot = list(to_plain(_get(sampler_cfg, "shot_range")))
        if len(way) != 2 or len(shot) != 2:
            raise ConfigError(f"sampler.way_range / shot_range: expected [low, high] pairs, got {way} / {shot}")
        return {**common, "way_range": (int(way[0]), None if way[1] is None else int(way[1])), "shot_range": (int(shot[0]), int(shot[1]))}
    raise ConfigError(f"sampler.mode: expected 'fixed' or 'variable', got {mode!r}")


def _multi_domain(meta_dataset: Any, tasks: Sequence[tuple[str, str]], sampler_cfg: Any, split: str, seed: int, where: str) -> Any:
    from medmeta.episodes import InsufficientDataError, MultiDomainSampler

    try:
        return MultiDomainSampler(meta_dataset, tasks=list(tasks), split=split, seed=int(seed), **_sampler_kwargs(sampler_cfg))
    except InsufficientDataError as err:
        raise ConfigError(f"{where}: no {split} episodes can be formed with these sampler settings: {err}") from err
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{where} ({split} split): {err}") from err


def build_train_sampler(meta_dataset: Any, tasks: Sequence[tuple[str, str]], sampler_cfg: Any, seed: int) -> Any:
    """The meta-training :class:`~medmeta.episodes.MultiDomainSampler` (train split)."""
    return _multi_domain(meta_dataset, tasks, sampler_cfg, "train", seed, "sampler")


def build_val_sampler(meta_dataset: Any, tasks: Sequence[tuple[str, str]], sampler_cfg: Any, seed: int, split: str = "val") -> Any:
    """The meta-validation sampler: same episode settings on the validation split, own seed."""
    from medmeta.evaluation.protocols import derive_seed

    return _multi_domain(meta_dataset, tasks, sampler_cfg, split, derive_seed(seed, "meta-validation") % (2**31), "sampler (validation)")


# optimisation ---------------------------------------------------------------------------------
def build_optimizer(trainer_cfg: Any, parameters: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum) over ``parameters`` from a ``trainer`` config."""
    name = str(_get(trainer_cfg, "optimizer")).lower()
    lr = float(_get(trainer_cfg, "lr"))
    wd = float(_get(trainer_cfg, "weight_decay"))
    if not lr > 0:
        raise ConfigError(f"trainer.lr: expected > 0, got {lr}")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ConfigError("the learner has no trainable parameters: nothing to train (evaluate it instead)")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(_get(trainer_cfg, "momentum")))
    raise ConfigError(f"trainer.optimizer: expected adam, adamw or sgd, got {name!r}")


def build_scheduler(trainer_cfg: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule per step: ``none``, ``cosine`` (to ``min_lr``) or ``step``
    (times ``gamma`` every ``step_size``), each after ``warmup_steps`` of linear warm-up."""
    name = str(_get(trainer_cfg, "scheduler")).lower()
    steps = int(_get(trainer_cfg, "steps"))
    warmup = int(_get(trainer_cfg, "warmup_steps"))
    base_lr = float(_get(trainer_cfg, "lr"))
    min_lr = float(_get(trainer_cfg, "min_lr"))
    step_size = int(_get(trainer_cfg, "step_size"))
    gamma = float(_get(trainer_cfg, "gamma"))
    if warmup < 0:
        raise ConfigError(f"trainer.warmup_steps: expected >= 0, got {warmup}")
    if name not in ("none", "cosine", "step"):
        raise ConfigError(f"trainer.scheduler: expected none, cosine or step, got {name!r}")
    if name == "step" and step_size < 1:
        raise ConfigError(f"trainer.step_size: expected >= 1, got {step_size}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if name == "cosine":
            span = max(1, steps - warmup)
            progress = min(1.0, t / span)
            floor = min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "step":
            return gamma ** (t // step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# evaluation -----------------------------------------------------------------------------------
def build_protocol(protocol_cfg: Any) -> Any:
    """:class:`medmeta.evaluation.protocols.ProtocolConfig` from a ``protocol`` config (the
    composed config already has its schema; this makes the validated runtime object)."""
    from medmeta.evaluation.protocols import ProtocolConfig

    if isinstance(protocol_cfg, ProtocolConfig):
        return protocol_cfg
    try:
        return ProtocolConfig(**dict(to_plain(protocol_cfg)))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"protocol: {err}") from err
