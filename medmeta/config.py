"""Structured configs of the experiment apps, registered in Hydra's ConfigStore.

Every YAML file in ``conf/`` names its schema in its defaults list (``- <group>_schema`` or a
learner's ``- <name>_schema``), so Hydra rejects unknown keys, wrong types and missing mandatory
values while composing, before any data is opened, and the YAML files only set what differs
from the schema's defaults. The dataclasses are plain Python too:
``OmegaConf.structured(TrainConfig)`` gives a valid default config without Hydra.

Groups: ``data`` (:class:`DataConfig`), ``sampler`` (:class:`SamplerConfig`), ``backbone``
(:class:`BackboneConfig`), ``learner`` (one schema per registered learner, derived from its
constructor by :func:`learner_schema`: the constructor is the one source of the learner's
arguments and defaults), ``trainer`` (:class:`TrainerConfig`), ``protocol``
(:class:`medmeta.evaluation.ProtocolConfig` itself), ``logger`` (:class:`LoggerConfig`). The
apps' primary configs are :class:`TrainConfig` and :class:`EvaluateConfig`.

:func:`register_configs` is idempotent and runs on import.
"""
from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import os
import types
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from medmeta.evaluation.protocols import ProtocolConfig

__all__ = [
    "TaskSelection",
    "DataConfig",
    "SamplerConfig",
    "BackboneConfig",
    "LearnerConfig",
    "APP_SUPPLIED",
    "constructor_parameters",
    "learner_schema",
    "learner_schemas",
    "learner_factory",
    "TrainerConfig",
    "ProtocolConfig",
    "WandbConfig",
    "LoggerConfig",
    "TrainConfig",
    "EvaluateConfig",
    "register_configs",
    "learner_kwargs",
]


# data ---------------------------------------------------------------------------------------
@dataclass
class TaskSelection:
    """Which tasks of the meta-dataset one phase (train / val / test) uses.

    ``None`` means "no restriction". ``tasks`` lists explicit ``"dataset_id/task_name"``
    entries; ``exclude`` removes dataset ids or ``"dataset_id/task_name"`` entries.
    """

    split: str = "train"
    dataset_ids: Optional[List[str]] = None
    domains: Optional[List[str]] = None
    targets: Optional[List[str]] = None
    tasks: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """A meta-dataset and the tasks each phase uses.

    Attributes:
        name: ``synthetic`` / ``real_mini`` (embedded in medmeta; ``root`` optional) or
            ``medimeta`` (a MedIMeta-format folder; ``root`` required).
        root: the data folder (``null``: the embedded copy for synthetic / real_mini).
        target: a held-out target dataset id: training and validation leave out it and the
            datasets it overlaps with (``domain_overlaps`` / ``subject_overlaps`` of its
            info.yaml), and testing uses its tasks.
        train, val, test: task selections of the three phases (``test`` defaults to the
            target's tasks when a target is given).
        channels: ``null`` keeps each dataset's channels (grayscale images are repeated to 3 by
            the backbone), ``3`` converts everything to RGB as the MedIMeta paper does, ``1`` to gray.
        normalize: ``auto`` (the mean/std of the backbone's weights: a named offline source's,
            timm's ``pretrained_cfg`` for ``pretrained=timm`` / ``timm:<tag>``; the official
            loader's mean = std = 0.5 for random initialisation), ``official``, ``imagenet``,
            ``clip``, explicit ``"mean=R,G,B;std=R,G,B"``, or ``null`` (values in [0, 1]).
        image_size: ``null`` reads images at their stored size; an int resizes every image
            (e.g. 64 for quick runs on MedIMeta's 224-pixel images); ``auto`` uses the input
            size of the backbone's weights (stored size for random initialisation).
    """

    name: str = "synthetic"
    root: Optional[str] = None
    target: Optional[str] = None
    channels: Optional[int] = None
    normalize: Optional[str] = "auto"
    image_size: Any = None  # null | int | "auto"
    train: TaskSelection = field(default_factory=lambda: TaskSelection(split="train"))
    val: TaskSelection = field(default_factory=lambda: TaskSelection(split="val"))
    test: TaskSelection = field(default_factory=lambda: TaskSelection(split="test"))


# episodes -------------------------------------------------------------------------------------
@dataclass
class SamplerConfig:
    """Meta-training episodes: fixed or variable way/shot, and how tasks are weighted.

    ``mode=fixed`` uses ``n_way`` (``null``: all classes) and ``n_shot``; ``mode=variable``
    draws way from ``way_range`` (``[low, null]``: up to all classes) and shot from
    ``shot_range`` per episode. ``weighting``: ``uniform``, ``size`` or ``tempered``
    (with ``temperature``) across tasks.
    """

    mode: str = "variable"
    n_way: Optional[int] = 5
    n_shot: int = 5
    way_range: List[Optional[int]] = field(default_factory=lambda: [2, None])
    shot_range: List[int] = field(default_factory=lambda: [1, 10])
    n_query: int = 10
    weighting: str = "uniform"
    temperature: float = 2.0
    on_insufficient: str = "skip"


# backbone -------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    """A timm model as feature extractor (:func:`medmeta.backbones.create_backbone`).

    ``pretrained``: ``null`` (random init), a local weights file, a named offline source
    (``imagenet-mobilenetv2``, ``imagenet-efficientnet-lite0``), or timm's weights. ``if_unavailable``: what to
    do when a named source's package is not installed: ``error`` (stop, saying what to
    install) or ``random`` (say so loudly and continue from random initialisation; the run
    records ``backbone_weights: random (fallback)``). A missing local file is always an error.
    ``image_size``: the input size the architecture was designed for (informational; the
    data config's ``image_size`` decides what the images are resized to).
    ``pretrained: timm`` (or ``true``, ``timm:<tag>``) loads timm's weights through the Hugging
    Face hub cache (``if_unavailable`` applies when they are neither cached nor downloadable).
    ``pool``: pooled feature of token models (ViT, DINOv2, CLIP, SigLIP): ``null`` (the model's
    own), ``token``, ``avg`` or ``token+avg``. ``trainable_blocks``: ``null`` trains the whole
    backbone, ``k`` only its last ``k`` blocks (partial fine-tuning; ``0`` freezes it). See
    docs/backbones.md.
    """

    name: str = "medmeta_conv4_tiny"
    pretrained: Optional[str] = None
    if_unavailable: str = "error"
    in_chans: int = 3
    image_size: int = 32
    pool: Optional[str] = None
    trainable_blocks: Optional[int] = None
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)


# learners -------------------------------------------------------------------------------------
@dataclass
class LearnerConfig:
    """Base of the learner schemas: ``name`` is the :func:`medmeta.learners.create_learner` name;
    every other field is passed to the learner's constructor."""

    name: str = MISSING


APP_SUPPLIED = frozenset({"backbone", "tasks"})
"""Constructor parameters the apps pass themselves (never set in a learner config)."""

_NONE = type(None)
_SCALARS = (int, float, bool, str)
_LIST: Any = List  # subscripted with types known only at run time
_DICT: Any = Dict


def _config_type(tp: Any) -> Any:
    """The OmegaConf-representable form of an annotation, or ``None`` when it has none.

    Members of a union that OmegaConf cannot hold (a callable, a module) are dropped, so
    ``Union[None, str, Callable]`` becomes ``Optional[str]``; a union of several representable
    types becomes ``Any``; sequences become lists and mappings ``Dict[str, ...]``.
    """
    if tp is Any or tp in _SCALARS:
        return tp
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        kept = [t for t in (_config_type(a) for a in args if a is not _NONE) if t is not None]
        if not kept:
            return None
        inner = kept[0] if len(kept) == 1 else Any
        return Optional[inner] if _NONE in args else inner
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        element = _config_type(items[0]) if len(set(items)) == 1 else Any
        return _LIST[element if element is not None else Any]
    if tp is dict or origin in (dict, collections.abc.Mapping):
        value = _config_type(args[1]) if len(args) == 2 else Any
        return _DICT[str, value if value is not None else Any]
    return None


def _representable(value: Any) -> bool:
    if value is None or isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_representable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _representable(v) for k, v in value.items())
    return False


def constructor_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The constructor parameters a learner config sets, by name, in signature order.

    Parameters the app supplies (:data:`APP_SUPPLIED`) are left out. A class whose
    ``__init__`` forwards ``**kwargs`` (the MAML variants) takes its parent's parameters, less
    the ones it fixes (``fixed_options``).
    """
    if not isinstance(factory, type):
        found = inspect.signature(factory).parameters
        return {n: p for n, p in found.items() if n not in APP_SUPPLIED and p.kind not in _VARIADIC}
    params: dict[str, inspect.Parameter] = {}
    for klass in factory.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        found = inspect.signature(init).parameters
        for name, p in list(found.items())[1:]:  # after self
            if p.kind not in _VARIADIC and name not in APP_SUPPLIED:
                params.setdefault(name, p.replace(annotation=_annotation(init, name)))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in found.values()):
            break
    fixed = dict(getattr(factory, "fixed_options", {}) or {})
    return {n: p for n, p in params.items() if n not in fixed}


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _annotation(function: Callable[..., Any], name: str) -> Any:
    return get_type_hints(function).get(name, Any)


def learner_schema(name: str, factory: Callable[..., Any]) -> type:
    """The Hydra schema of a learner, derived from its constructor: one field per parameter
    (:func:`constructor_parameters`) with the constructor's default, plus ``name``.

    Raises ``TypeError`` for a parameter whose default OmegaConf cannot hold (such a learner
    needs an explicit schema).
    """
    spec: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for pname, p in constructor_parameters(factory).items():
        annotation = p.annotation if p.annotation is not inspect.Parameter.empty else Any
        tp = _config_type(annotation)
        if tp is None:
            tp = Any
        if p.default is inspect.Parameter.empty:
            spec.append((pname, tp, field(default=MISSING)))
            continue
        if not _representable(p.default):
            raise TypeError(
                f"learner {name!r}: the default of {pname}={p.default!r} cannot be written in a config; "
                f"give it a plain default (None, a number, a string, a list or a dict)"
            )
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        if isinstance(default, (list, dict)):
            spec.append((pname, tp, field(default_factory=functools.partial(copy.deepcopy, default))))
        else:
            spec.append((pname, tp, field(default=default)))
    title = getattr(factory, "__name__", name)
    schema = make_dataclass(f"{title}Config", spec, bases=(LearnerConfig,))
    schema.__module__ = __name__
    schema.__doc__ = f"Schema of learner={name} (derived from {title}'s constructor)."
    return schema


def learner_factory(name: str) -> Callable[..., Any]:
    """The registered factory (usually the class) of learner ``name``."""
    from medmeta.learners.registry import LEARNERS

    return LEARNERS.get(name)


def learner_schemas() -> dict[str, type]:
    """One derived schema per registered learner (see :func:`learner_schema`)."""
    from medmeta.learners import list_learners

    return {name: learner_schema(name, learner_factory(name)) for name in list_learners()}


def learner_kwargs(cfg: Any) -> dict[str, Any]:
    """Constructor keyword arguments of a learner config (every field but ``name``)."""
    if OmegaConf.is_config(cfg):
        items = OmegaConf.to_container(cfg, resolve=True)
    else:
        items = cfg if isinstance(cfg, dict) else vars(cfg)
    if not isinstance(items, dict):
        raise TypeError(f"learner config: expected a mapping of constructor arguments, got {cfg!r}")
    return {str(k): v for k, v in items.items() if k != "name"}


# training -------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """The training loop (meta-training, or multi-task pre-training for ``mm_pt``).

    Steps are optimiser updates; one step consumes ``meta_batch_size`` episodes (or one mixed
    batch of ``batch_size`` images for ``mm_pt``). Validation runs every ``val_every`` steps on
    ``val_episodes`` fixed episodes (``mm_pt``: each training task's head on up to
    ``val_max_items`` images of its validation split; ``val_episodes=0`` disables validation);
    ``patience`` counts validation rounds without improvement of ``monitor`` (``null``: no
    early stopping).
    ``resume``: ``null`` resumes when the run folder holds ``checkpoints/last.pt`` (a requeued
    job continues), ``true`` requires it, ``false`` starts fresh. ``resume_from``: a checkpoint
    file or run folder to continue from (writing into the current run folder).
    ``num_threads``: torch's CPU threads for this process (``null``: ``$MEDMETA_NUM_THREADS``, else
    the CPUs this process may use shared with its ``num_workers`` and torchrun's local ranks; see
    :mod:`medmeta.threads`).
    """

    steps: int = 200
    meta_batch_size: int = 4
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.5
    min_lr: float = 0.0
    grad_clip: Optional[float] = None
    val_every: int = 50
    val_episodes: int = 32
    val_max_items: int = 512
    monitor: str = "val/auroc"
    monitor_mode: str = "max"
    patience: Optional[int] = None
    min_delta: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"
    dist_backend: str = "auto"
    seed: int = 0
    num_workers: int = 0
    num_threads: Optional[int] = None
    resume: Optional[bool] = None
    resume_from: Optional[str] = None
    progress: bool = True
    test: bool = True


@dataclass
class WandbConfig:
    project: str = "medmeta"
    mode: str = "offline"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Metric backends among ``csv``, ``tensorboard``, ``wandb`` (W&B only when listed)."""

    backends: List[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


# primary configs ------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """``experiments/train.py``: meta-train (or pre-train) a learner, then test it.

    ``test_learner`` (optional) is the learner that the trained backbone is tested with (mm-PT
    trains heads per task and is tested by fine-tuning, so it sets ``finetune``); ``null``
    tests the trained learner itself. ``run_dir``: the output folder (``null``: Hydra's).
    """

    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learner: LearnerConfig = MISSING
    test_learner: Optional[LearnerConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_name: str = "train"
    run_dir: Optional[str] = None
    output_root: str = "outputs"


@dataclass
class EvaluateConfig:
    """``experiments/evaluate.py``: evaluate learners under a protocol on the test tasks.

    ``learners`` maps method names to learner configs (compose with
    ``+learner@learners.<name>=<option>``). ``checkpoint``: a medmeta checkpoint or run folder;
    learners of the checkpoint's method load all their weights, the others its backbone
    (``checkpoint_load``: ``auto``, ``backbone`` or ``learner``). ``num_threads``: torch's CPU
    threads (``null``: ``$MEDMETA_NUM_THREADS``, else the CPUs this process may use; see
    :mod:`medmeta.threads`).
    """

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learners: Dict[str, LearnerConfig] = field(default_factory=dict)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: Optional[str] = None
    checkpoint_load: str = "auto"
    device: str = "auto"
    num_threads: Optional[int] = None
    seed: int = 0
    progress: bool = True
    run_name: str = "evaluate"
    run_dir: Optional[str] = None
    output_root: str = "outputs"


# registration --------------------------------------------------------------------------------
def _rank_suffix() -> str:
    """``""`` on rank 0 (or without distributed), ``"_rank<k>"`` elsewhere: per-rank log files."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return "" if rank == 0 else f"_rank{rank}"


def _run_stamp() -> str:
    """A run-folder stamp shared by every rank: torchrun's run id when launched by torchrun,
    else the time (``YYYY-MM-DD/HH-MM-SS``)."""
    import datetime

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{run_id}"
    return datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


_REGISTERED = False


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore and register the resolvers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="sampler", name="sampler_schema", node=SamplerConfig)
    cs.store(group="backbone", name="backbone_schema", node=BackboneConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="protocol", name="protocol_schema", node=ProtocolConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, schema in learner_schemas().items():
        cs.store(group="learner", name=f"{name}_schema", node=schema)
    try:  # schemas of the launcher / sweeper plugins, so our presets can extend them
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

        cs.store(group="hydra/launcher", name="submitit_slurm_schema", node=SlurmQueueConf)
        cs.store(group="hydra/launcher", name="submitit_local_schema", node=LocalQueueConf)
    except ImportError:
        pass
    if not OmegaConf.has_resolver("medmeta_rank_suffix"):
        OmegaConf.register_new_resolver("medmeta_rank_suffix", _rank_suffix, use_cache=True)
    if not OmegaConf.has_resolver("medmeta_run_stamp"):
        OmegaConf.register_new_resolver("medmeta_run_stamp", _run_stamp, use_cache=True)
    _REGISTERED = True


register_configs()

