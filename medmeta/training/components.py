"""Build the pieces of an experiment from its config, validating everything at startup.

Each function turns one config group into library objects (meta-dataset, task lists,
backbone, learner, samplers, optimiser, scheduler, protocol) and raises an error that names the
config option and what was expected *before* any long work starts: a missing data root, a
dataset id or task name that does not exist, a learner argument the learner does not take.
Scripts can call these directly; the Hydra apps are thin wrappers around them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from medmeta.tasks import TaskTarget

__all__ = [
    "ConfigError",
    "TaskPlan",
    "to_plain",
    "open_meta_dataset",
    "resolve_normalize",
    "ResizedMetaDataset",
    "resolve_tasks",
    "build_backbone",
    "build_learner",
    "learner_name",
    "build_train_sampler",
    "build_val_sampler",
    "build_optimizer",
    "build_scheduler",
    "build_protocol",
    "EMBEDDED_DATA",
]

EMBEDDED_DATA = {"synthetic": "synthetic", "real_mini": "real"}
"""Config name of an embedded data set -> its name in :mod:`medmeta.data.embedded`."""

_LEARNER_ALIASES = {"mm_pt": "mmpt"}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and what is expected."""


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
def resolve_normalize(normalize: Optional[str], pretrained: Optional[str]) -> Optional[str]:
    """The image normalisation a run uses: ``auto`` follows the backbone's weights.

    ``auto``: a named offline source's own statistics (``imagenet`` for ImageNet mean/std,
    ``official`` for mean = std = 0.5), ``imagenet`` for a local weights file, and the official
    MedIMeta loader's ``official`` (mean = std = 0.5) for random initialisation.
    """
    if normalize is None or str(normalize) != "auto":
        return None if normalize is None else str(normalize)
    if not pretrained:
        return "official"
    from medmeta.backbones.pretrained import list_pretrained_sources, pretrained_normalization
    from medmeta.data.medimeta import NORMALIZATIONS

    if str(pretrained) in list_pretrained_sources():
        mean, std = pretrained_normalization(str(pretrained))
        for name, (m, s) in NORMALIZATIONS.items():
            if np_close(mean, m) and np_close(std, s):
                return name
        return "official"
    return "imagenet"


def np_close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))


class ResizedMetaDataset:
    """A meta-dataset whose sources all read images at one ``image_size`` (``data.image_size``).

    Delegates everything else to the wrapped :class:`~medmeta.data.meta_dataset.MetaDataset`.
    """

    def __init__(self, meta_dataset: Any, image_size: int) -> None:
        self.meta_dataset = meta_dataset
        self.image_size = int(image_size)

    def source(self, dataset_id: str, task_name: str, split: Any = "train", **kwargs: Any) -> Any:
        kwargs.setdefault("image_size", self.image_size)
        return self.meta_dataset.source(dataset_id, task_name, split=split, **kwargs)

    def held_out(self, target: str) -> "ResizedMetaDataset":
        return ResizedMetaDataset(self.meta_dataset.held_out(target), self.image_size)

    def __getattr__(self, name: str) -> Any:
        if name == "meta_dataset":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.meta_dataset, name)

    def __repr__(self) -> str:
        return f"ResizedMetaDataset({self.meta_dataset!r}, image_size={self.image_size})"


def open_meta_dataset(data_cfg: Any, pretrained: Optional[str] = None) -> Any:
    """The meta-dataset a ``data`` config names (embedded copy, or a MedIMeta-format folder).

    ``data.channels`` / ``data.normalize`` / ``data.image_size`` set how every task reads its
    images; ``pretrained`` (``backbone.pretrained``) resolves ``normalize=auto``.
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
    channels = _get(data_cfg, "channels")
    if channels is not None and int(channels) not in (1, 3):
        raise ConfigError(f"data.channels: expected null (as stored), 1 or 3, got {channels}")
    normalize = resolve_normalize(_get(data_cfg, "normalize", "auto"), pretrained)
    from medmeta.data.medimeta import NORMALIZATIONS

    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ConfigError(f"data.normalize: expected auto, null or one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
    image_size = _get(data_cfg, "image_size")
    if image_size is not None and int(image_size) < 1:
        raise ConfigError(f"data.image_size: expected null (as stored) or a positive size, got {image_size}")

    from medmeta.data.meta_dataset import MetaDataset

    if root is None:
        from medmeta.data.embedded import open_default

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
    try:
        meta = MetaDataset(path, channels=None if channels is None else int(channels), normalize=normalize)
        if not list(meta.tasks):
            raise ValueError("no dataset with an info.yaml was found")
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"data.root={path}: cannot be read as a MedIMeta-format meta-dataset: {err}") from err
    return meta if image_size is None else ResizedMetaDataset(meta, int(image_size))


@dataclass
class TaskPlan:
    """The ``(dataset_id, task_name)`` pairs of each phase, and what the target left out."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    left_out: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": [f"{d}/{t}" for d, t in self.train],
            "val": [f"{d}/{t}" for d, t in self.val],
            "test": [f"{d}/{t}" for d, t in self.test],
            "left_out_datasets": list(self.left_out),
        }


def _entry_target(entry: Any) -> TaskTarget:
    return TaskTarget.parse(getattr(entry, "target"))


def _classification(entry: Any) -> bool:
    from medmeta.episodes.labels import SUPPORTED_TARGETS

    return _entry_target(entry) in SUPPORTED_TARGETS


def _select(entries: Sequence[Any], sel: Any, where: str, all_entries: Sequence[Any]) -> list[tuple[str, str]]:
    """Apply one :class:`~medmeta.config.TaskSelection` to task entries, validating every name."""
    known_ids = sorted({e.dataset_id for e in all_entries})
    known_domains = sorted({str(e.domain) for e in all_entries})
    known_tasks = {(e.dataset_id, e.task_name) for e in all_entries}

    def names(key: str) -> Optional[list[str]]:
        value = to_plain(_get(sel, key))
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in value]

    ids, domains, targets, tasks = names("dataset_ids"), names("domains"), names("targets"), names("tasks")
    exclude = names("exclude") or []
    for i in ids or []:
        if i not in known_ids:
            raise ConfigError(f"{where}.dataset_ids: unknown dataset id {i!r}; the meta-dataset has {known_ids}")
    for d in domains or []:
        if d not in known_domains:
            raise ConfigError(f"{where}.domains: unknown domain {d!r}; the meta-dataset has {known_domains}")
    parsed_targets = None
    if targets is not None:
        parsed_targets = {TaskTarget.parse(t, where=f"{where}.targets") for t in targets}

    def parse_task(text: str, key: str) -> tuple[str, str]:
        if "/" not in text:
            raise ConfigError(f"{where}.{key}: {text!r} should be 'dataset_id/task_name'")
        ds, name = text.split("/", 1)
        if ds not in known_ids:
            raise ConfigError(f"{where}.{key}: unknown dataset id {ds!r} in {text!r}; the meta-dataset has {known_ids}")
        if (ds, name) not in known_tasks:
            have = sorted(t for d, t in known_tasks if d == ds)
            raise ConfigError(f"{where}.{key}: dataset {ds!r} has no task {name!r}; its tasks are {have}")
        return ds, name

    explicit = None if tasks is None else [parse_task(t, "tasks") for t in tasks]
    excluded_ids, excluded_tasks = set(), set()
    for item in exclude:
        if "/" in item:
            excluded_tasks.add(parse_task(item, "exclude"))
        elif item in known_ids:
            excluded_ids.add(item)
        else:
            raise ConfigError(
                f"{where}.exclude: {item!r} is neither a dataset id nor 'dataset_id/task_name'; dataset ids are {known_ids}"
            )
    out = []
    for e in entries:
        key = (e.dataset_id, e.task_name)
        if explicit is not None and key not in explicit:
            continue
        if ids is not None and e.dataset_id not in ids:
            continue
        if domains is not None and str(e.domain) not in domains:
            continue
        if parsed_targets is not None and _entry_target(e) not in parsed_targets:
            continue
        if e.dataset_id in excluded_ids or key in excluded_tasks:
            continue
        if not _classification(e):
            if explicit is not None:
                raise ConfigError(
                    f"{where}.tasks: {e.dataset_id}/{e.task_name} has target {_entry_target(e).value}, "
                    f"which few-shot classification cannot use"
                )
            continue
        out.append(key)
    return out


def resolve_tasks(meta_dataset: Any, data_cfg: Any, need: Sequence[str] = ("train", "val", "test")) -> TaskPlan:
    """Train / val / test task lists of a ``data`` config (see :class:`~medmeta.config.DataConfig`).

    With ``data.target`` set, train and val leave out the target and its overlapping datasets
    (``meta_dataset.held_out(target)``) and test defaults to the target's tasks. Every phase in
    ``need`` must end up with at least one task.
    """
    entries = list(meta_dataset.tasks)
    target = _get(data_cfg, "target")
    left_out: list[str] = []
    pool = entries
    test_pool = entries
    if target is not None:
        known_ids = sorted({e.dataset_id for e in entries})
        if target not in known_ids:
            raise ConfigError(f"data.target: unknown dataset id {target!r}; the meta-dataset has {known_ids}")
        kept = meta_dataset.held_out(target)
        kept_keys = {(e.dataset_id, e.task_name) for e in kept.tasks}
        pool = [e for e in entries if (e.dataset_id, e.task_name) in kept_keys]
        left_out = sorted({e.dataset_id for e in entries} - {e.dataset_id for e in pool})
        test_pool = [e for e in entries if e.dataset_id == target]
    plan = TaskPlan(
        train=_select(pool, _get(data_cfg, "train"), "data.train", entries),
        val=_select(pool, _get(data_cfg, "val"), "data.val", entries),
        test=_select(test_pool, _get(data_cfg, "test"), "data.test", entries),
        left_out=left_out,
    )
    for phase in need:
        if not getattr(plan, phase):
            extra = f" (target {target!r} leaves out {left_out})" if target is not None else ""
            raise ConfigError(f"data.{phase}: the selection matches no classification task{extra}")
    return plan


# models ----------------------------------------------------------------------------------------
def build_backbone(backbone_cfg: Any) -> nn.Module:
    """:func:`medmeta.backbones.create_backbone` from a ``backbone`` config.

    The returned module carries ``weights_origin`` (``"random"``, the named source, the weights
    file, or ``"random (fallback: ...)"``) so that runs can record what they started from.
    With ``if_unavailable=random`` a named offline source whose package is not installed is
    replaced by random initialisation, with a warning that says what to install.
    """
    import logging
    import warnings

    from medmeta.backbones import create_backbone

    name = str(_get(backbone_cfg, "name"))
    pretrained = _get(backbone_cfg, "pretrained")
    policy = str(_get(backbone_cfg, "if_unavailable", "error") or "error")
    if policy not in ("error", "random"):
        raise ConfigError(f"backbone.if_unavailable: expected error or random, got {policy!r}")
    kwargs = dict(to_plain(_get(backbone_cfg, "timm_kwargs")) or {})
    in_chans = int(_get(backbone_cfg, "in_chans", 3))
    origin = str(pretrained) if pretrained else "random"
    try:
        backbone = create_backbone(name, pretrained=pretrained, in_chans=in_chans, **kwargs)
    except ModuleNotFoundError as err:  # a named source whose package is not installed
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
            backbone = create_backbone(name, pretrained=None, in_chans=in_chans, **kwargs)
        except (ValueError, TypeError) as err2:
            raise ConfigError(f"backbone (name={name}): {err2}") from err2
        origin = f"random (fallback: {pretrained} not installed)"
    except FileNotFoundError as err:
        raise ConfigError(f"backbone.pretrained={pretrained}: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"backbone (name={name}, pretrained={pretrained}): {err}") from err
    backbone.weights_origin = origin
    return backbone


def learner_name(learner_cfg: Any) -> str:
    """The registry name of a learner config (``mm_pt`` -> ``mmpt``)."""
    name = str(_get(learner_cfg, "name")).strip().lower().replace("-", "_")
    return _LEARNER_ALIASES.get(name, name)


def build_learner(learner_cfg: Any, backbone: nn.Module, tasks: Optional[Sequence[Any]] = None, where: str = "learner") -> Any:
    """:func:`medmeta.learners.create_learner` from a learner config; ``tasks`` (task
    descriptions) are passed to learners that take them (mm-PT)."""
    from medmeta.learners import create_learner, list_learners

    from medmeta.config import learner_kwargs

    name = learner_name(learner_cfg)
    kwargs = learner_kwargs(learner_cfg)
    if name == "mmpt":
        if tasks is None:
            raise ConfigError(f"{where}=mm_pt needs the training tasks (it is trained by experiments/train.py)")
        kwargs["tasks"] = list(tasks)
    try:
        return create_learner(name, backbone, **kwargs)
    except (TypeError, ValueError) as err:
        known = list_learners()
        raise ConfigError(f"{where} (name={name}): {err}" + ("" if name in known else f"; known learners: {known}")) from err


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
    """:class:`medmeta.evaluation.protocols.ProtocolConfig` from a ``protocol`` config."""
    from medmeta.evaluation.protocols import ProtocolConfig

    data = dict(to_plain(protocol_cfg))
    known = {f.name for f in fields(ProtocolConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"protocol: unknown option(s) {unknown}; ProtocolConfig takes {sorted(known)}")
    data["shots"] = tuple(data.get("shots", ()))
    data["metrics"] = tuple(data.get("metrics", ()))
    try:
        return ProtocolConfig(**data)
    except ValueError as err:
        raise ConfigError(f"protocol: {err}") from err
