"""Structured configs of the experiment apps, registered in Hydra's ConfigStore.

Every YAML file in ``conf/`` names its schema in its defaults list (``- <group>_schema`` or a
learner-specific schema), so Hydra rejects unknown keys, wrong types and missing mandatory
values while composing, before any data is opened. The dataclasses are plain Python too:
``OmegaConf.structured(TrainConfig)`` gives a valid default config without Hydra.

Groups (one dataclass each): ``data`` (:class:`DataConfig`), ``sampler``
(:class:`SamplerConfig`), ``backbone`` (:class:`BackboneConfig`), ``learner`` (one subclass of
:class:`LearnerConfig` per method, field names equal to the learner's constructor arguments),
``trainer`` (:class:`TrainerConfig`), ``protocol`` (:class:`ProtocolSettings`, mirroring
:class:`medmeta.evaluation.ProtocolConfig`), ``logger`` (:class:`LoggerConfig`). The apps'
primary configs are :class:`TrainConfig` and :class:`EvaluateConfig`.

:func:`register_configs` is idempotent and runs on import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

__all__ = [
    "TaskSelection",
    "DataConfig",
    "SamplerConfig",
    "BackboneConfig",
    "LearnerConfig",
    "ProtoNetConfig",
    "LinearProbeConfig",
    "FinetuneConfig",
    "MAMLConfig",
    "FOMAMLConfig",
    "ANILConfig",
    "MetaSGDConfig",
    "ProtoMAMLConfig",
    "MultiTaskPretrainConfig",
    "LEARNER_CONFIGS",
    "TrainerConfig",
    "ProtocolSettings",
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
        normalize: ``auto`` (follow the backbone's pretrained weights: ImageNet statistics for
            ImageNet weights, else the official loader's mean = std = 0.5), ``official``,
            ``imagenet`` or ``null`` (values in [0, 1]).
        image_size: ``null`` reads images at their stored size; an int resizes every image
            (e.g. 64 for quick runs on MedIMeta's 224-pixel images).
    """

    name: str = "synthetic"
    root: Optional[str] = None
    target: Optional[str] = None
    channels: Optional[int] = None
    normalize: Optional[str] = "auto"
    image_size: Optional[int] = None
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

    ``pretrained``: ``null`` (random init), a local weights file, or a named offline source
    (``imagenet-mobilenetv2``, ``imagenet-efficientnet-lite0``). ``if_unavailable``: what to
    do when a named source's package is not installed: ``error`` (stop, saying what to
    install) or ``random`` (say so loudly and continue from random initialisation; the run
    records ``backbone_weights: random (fallback)``). A missing local file is always an error.
    ``image_size``: the input size the architecture was designed for (informational; the
    data config's ``image_size`` decides what the images are resized to).
    """

    name: str = "medmeta_conv4_tiny"
    pretrained: Optional[str] = None
    if_unavailable: str = "error"
    in_chans: int = 3
    image_size: int = 32
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)


# learners -------------------------------------------------------------------------------------
@dataclass
class LearnerConfig:
    """Base of the learner schemas: ``name`` is the :func:`medmeta.learners.create_learner` name;
    every other field is passed to the learner's constructor."""

    name: str = MISSING


@dataclass
class ProtoNetConfig(LearnerConfig):
    name: str = "protonet"
    distance: str = "euclidean"
    normalize: Optional[str] = None
    temperature: Optional[float] = None
    learn_temperature: bool = False
    ordinal_loss: str = "ce"


@dataclass
class LinearProbeConfig(LearnerConfig):
    name: str = "linear_probe"
    weight_decay: float = 1e-3
    solver: str = "lbfgs"
    max_iter: int = 100
    lr: Optional[float] = None
    normalize: Optional[str] = None
    ordinal_loss: str = "ce"


@dataclass
class FinetuneConfig(LearnerConfig):
    """Fine-tuning with a new head per episode (MedIMeta test: Adam, 50 steps, lr 1e-3)."""

    name: str = "finetune"
    steps: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: Optional[int] = None
    augment: Optional[str] = None
    weight_decay: float = 0.0
    backbone_lr: Optional[float] = None
    head_init: str = "default"
    ordinal_loss: str = "ce"


@dataclass
class _MAMLCommon(LearnerConfig):
    """Arguments shared by MAML and its variants (each variant fixes one more of its own)."""

    inner_steps: int = 4
    inner_lr: float = 0.1
    eval_inner_steps: int = 32
    eval_inner_lr: Optional[float] = None
    bn_mode: str = "transductive"
    vmap: bool = False
    update_running_stats: bool = True
    ordinal_loss: str = "ce"


@dataclass
class MAMLConfig(_MAMLCommon):
    """MAML with a new (zero-initialised) head per task (MedIMeta mm-MAML)."""

    name: str = "maml"
    first_order: bool = False
    head_only: bool = False
    learn_inner_lr: bool = False
    head_init: str = "zero"


@dataclass
class FOMAMLConfig(_MAMLCommon):
    """First-order MAML (``first_order`` fixed)."""

    name: str = "fomaml"
    head_only: bool = False
    learn_inner_lr: bool = False
    head_init: str = "zero"


@dataclass
class ANILConfig(_MAMLCommon):
    """ANIL: only the head adapts in the inner loop (``head_only`` fixed)."""

    name: str = "anil"
    first_order: bool = False
    learn_inner_lr: bool = False
    head_init: str = "zero"


@dataclass
class MetaSGDConfig(_MAMLCommon):
    """Meta-SGD: learned per-parameter inner learning rates (``learn_inner_lr`` fixed)."""

    name: str = "metasgd"
    first_order: bool = False
    head_only: bool = False
    head_init: str = "zero"


@dataclass
class ProtoMAMLConfig(_MAMLCommon):
    """Proto-MAML: head initialised from prototypes (``head_init`` fixed)."""

    name: str = "protomaml"
    first_order: bool = False
    head_only: bool = False
    learn_inner_lr: bool = False


@dataclass
class MultiTaskPretrainConfig(LearnerConfig):
    """mm-PT: one head per training task on a shared backbone (MedIMeta paper)."""

    name: str = "mm_pt"
    ordinal_loss: str = "ce"
    eval_learner: str = "finetune"
    eval_kwargs: Dict[str, Any] = field(default_factory=dict)


LEARNER_CONFIGS: Dict[str, type] = {
    "protonet": ProtoNetConfig,
    "linear_probe": LinearProbeConfig,
    "finetune": FinetuneConfig,
    "maml": MAMLConfig,
    "fomaml": FOMAMLConfig,
    "anil": ANILConfig,
    "metasgd": MetaSGDConfig,
    "protomaml": ProtoMAMLConfig,
    "mm_pt": MultiTaskPretrainConfig,
}


def learner_kwargs(cfg: Any) -> dict[str, Any]:
    """Constructor keyword arguments of a learner config (every field but ``name``)."""
    if OmegaConf.is_config(cfg):
        data = OmegaConf.to_container(cfg, resolve=True)
    elif isinstance(cfg, dict):
        data = dict(cfg)
    else:
        data = dict(vars(cfg))
    data.pop("name", None)
    return data


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
    resume: Optional[bool] = None
    resume_from: Optional[str] = None
    progress: bool = True
    test: bool = True


@dataclass
class ProtocolSettings:
    """Hydra-typed mirror of :class:`medmeta.evaluation.ProtocolConfig` (lists for tuples)."""

    name: str = "custom"
    shots: List[int] = field(default_factory=lambda: [5])
    instances: int = 100
    n_query: int = 10
    n_way: Optional[int] = None
    metrics: List[str] = field(default_factory=lambda: ["accuracy", "balanced_accuracy", "auroc", "mae"])
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    aggregate: str = "mean_ci"
    seed: int = 0
    split: str = "test"
    episode_dir: Optional[str] = None
    on_insufficient: str = "error"
    report_scale: Dict[str, float] = field(default_factory=dict)
    feature_cache: bool = True
    embed_batch_size: int = 256


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
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
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
    (``checkpoint_load``: ``auto``, ``backbone`` or ``learner``).
    """

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learners: Dict[str, LearnerConfig] = field(default_factory=dict)
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: Optional[str] = None
    checkpoint_load: str = "auto"
    device: str = "auto"
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
    cs.store(group="protocol", name="protocol_schema", node=ProtocolSettings)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, schema in LEARNER_CONFIGS.items():
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


def schema_fields(schema: type) -> list[str]:
    """Field names of a config dataclass (used by tests and error messages)."""
    return [f.name for f in fields(schema)]
