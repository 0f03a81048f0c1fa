"""The bodies of the experiment apps: ``run_training(cfg)`` and ``run_evaluation(cfg)``.

Both take a composed config (a Hydra ``DictConfig`` or the dataclasses of
:mod:`medmeta.config`), validate everything that can be checked cheaply (data root, task
names, learner arguments, episode feasibility, logger backends, a checkpoint to resume)
before any training or evaluation starts, write their outputs into the run folder and print
a result table. ``run_training`` refuses a learner that cannot train (``training_kind`` None)
before it opens any data, and trains the others by their ``training_kind`` (episodic
meta-training or multi-task pre-training). They only wire together the parts that
:mod:`medmeta.training.components` builds from the config groups. ``experiments/train.py`` /
``evaluate.py`` and the console commands only call them.

Run folder of ``run_training``::

    config.yaml            the resolved config (what reproduces the run)
    tasks.json             train / val / test tasks after the held-out target was applied
    metrics.csv            long-format metrics (step, name, value, time); tensorboard/ beside it
    checkpoints/last.pt    resumable state (model, optimiser, scheduler, step, early stopping,
                           episode stream, RNG states), written atomically
    checkpoints/best.pt    the state with the best validation metric; best_backbone.pt its
                           backbone weights (usable as backbone.pretrained=...)
    test/                  results.csv, summary.md and plot of the protocol on the test tasks
    final_metrics.json     best validation metric, steps, test summary
"""
from __future__ import annotations

import copy
import json
import logging
import random
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

import medmeta.config  # noqa: F401  (registers the structured configs, for compose() users)
from medmeta.data.meta_dataset import TaskPlan, plan_tasks
from medmeta.errors import ConfigError
from medmeta.evaluation.reports import protocol_summary, results_table
from medmeta.locks import hold as hold_folder
from medmeta.threads import apply_num_threads
from medmeta.training.components import (
    build_backbone,
    build_learner,
    build_optimizer,
    build_protocol,
    build_scheduler,
    build_train_sampler,
    build_val_sampler,
    learner_class,
    learner_name,
    open_meta_dataset,
    resolve_data_config,
    to_plain,
)
from medmeta.training.fit import resume_checkpoint

__all__ = [
    "run_training",
    "run_evaluation",
    "resolve_run_dir",
    "seed_everything",
    "write_json_atomic",
    "training_fingerprint",
    "find_resume_checkpoint",
]

log = logging.getLogger("medmeta.training")


# helpers ----------------------------------------------------------------------------------------
def _as_config(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.structured(cfg)


def write_json_atomic(path: "str | Path", data: Any) -> Path:
    """JSON with a temporary file and ``os.replace``."""
    from medmeta.io import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def _write_config(path: Path, cfg: DictConfig) -> None:
    from medmeta.io import write_bytes_atomic

    write_bytes_atomic(path, OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(int(seed))
    np.random.seed(int(seed) % (2**32))
    torch.manual_seed(int(seed))


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir`` if set, else Hydra's output folder of this job."""
    if cfg.get("run_dir"):
        path = Path(str(cfg.run_dir)).expanduser()
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:
            raise ConfigError(
                "run_dir is not set and no Hydra run is active: pass run_dir=/path/to/run (or start the app "
                "through experiments/ or the medmeta-train / medmeta-evaluate commands)"
            ) from None
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_common(cfg: DictConfig) -> None:
    from medmeta.training.loggers import check_backends

    check_backends(list(cfg.logger.backends))
    mode = str(cfg.logger.wandb.mode)
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode: expected offline, online or disabled, got {mode!r}")


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    positive = ("meta_batch_size", "batch_size", "val_every", "checkpoint_every", "log_every")
    for key in positive:
        if int(t[key]) < 1:
            raise ConfigError(f"trainer.{key}: expected >= 1, got {t[key]}")
    if int(t.steps) < 0:
        raise ConfigError(f"trainer.steps: expected >= 0, got {t.steps}")
    if int(t.val_episodes) < 0:
        raise ConfigError(f"trainer.val_episodes: expected >= 0, got {t.val_episodes}")
    if int(t.num_workers) < 0:
        raise ConfigError(f"trainer.num_workers: expected >= 0, got {t.num_workers}")
    if t.monitor_mode not in ("max", "min"):
        raise ConfigError(f"trainer.monitor_mode: expected max or min, got {t.monitor_mode!r}")
    if t.grad_clip is not None and not float(t.grad_clip) > 0:
        raise ConfigError(f"trainer.grad_clip: expected > 0 or null, got {t.grad_clip}")


def _learner_tasks(meta_dataset: Any, tasks: Sequence[tuple[str, str]], split: str) -> list[Any]:
    return [meta_dataset.source(d, t, split=split) for d, t in tasks]


def training_fingerprint(cfg: DictConfig, model: torch.nn.Module, plan: TaskPlan,
                         data: Optional[DictConfig] = None) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (see ``check_compatible``).

    ``data``: the run's resolved data settings (:func:`resolve_data_config`; default: resolved
    from ``cfg``)."""
    from medmeta.training.checkpoint import model_fingerprint

    t = cfg.trainer
    trainer_keys = [
        "meta_batch_size", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "scheduler",
        "warmup_steps", "step_size", "gamma", "min_lr", "grad_clip", "seed",
    ]
    trainer = {k: to_plain(t[k]) for k in trainer_keys}
    if str(t.scheduler) != "none":
        trainer["steps"] = int(t.steps)  # the schedule depends on the total
    backbone = {k: to_plain(cfg.backbone[k]) for k in ("name", "in_chans", "timm_kwargs")}
    if data is None:
        data = resolve_data_config(cfg.data, cfg.backbone)
    return {
        "learner": to_plain(cfg.learner),
        "data": {k: to_plain(data.get(k)) for k in ("name", "channels", "normalize", "image_size")},
        "backbone": backbone,
        "sampler": to_plain(cfg.sampler),
        "trainer": trainer,
        "train_tasks": [f"{d}/{n}" for d, n in plan.train],
        "val_tasks": [f"{d}/{n}" for d, n in plan.val],
        "model_shapes": model_fingerprint(model),
    }


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint this run continues from (``trainer.resume`` / ``resume_from``), or None."""
    resume_from = cfg.trainer.resume_from
    if resume_from:
        path = Path(str(resume_from)).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise ConfigError(
                f"trainer.resume_from={resume_from}: no checkpoint there (expected a .pt file or a run folder "
                f"with checkpoints/last.pt)"
            )
        return path
    return resume_checkpoint(
        run_dir, cfg.trainer.resume, option="trainer.resume",
        hint="point hydra.run.dir (or run_dir) at the run folder to resume, or use trainer.resume_from=/path/to/last.pt",
    )


def _check_protocol_feasible(meta_dataset: Any, tasks: Sequence[tuple[str, str]], protocol: Any) -> None:
    """Sample (labels only) the protocol's episodes of every test task now, so that a task with
    too few images fails before training rather than after it."""
    from medmeta.episodes import InsufficientDataError
    from medmeta.evaluation.protocols import protocol_episodes

    for dataset_id, task_name in tasks:
        source = meta_dataset.source(dataset_id, task_name, split=protocol.split)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                protocol_episodes(source, protocol, episode_dir=None, skipped=[])
        except InsufficientDataError as err:
            raise ConfigError(
                f"protocol={protocol.name}: test task {dataset_id}/{task_name} ({protocol.split} split) cannot form its "
                f"episodes: {err}; lower protocol.shots / protocol.n_query or set protocol.on_insufficient=skip"
            ) from err


def _mixed_sampling(weighting: str) -> str:
    if weighting == "uniform":
        return "uniform"
    if weighting == "size":
        return "proportional"
    raise ConfigError(
        f"sampler.weighting={weighting!r}: mm_pt pre-training mixes tasks 'uniform'ly or by 'size' (proportional)"
    )


def _training_kind(cfg: DictConfig) -> Optional[str]:
    """How ``cfg.learner`` trains (its ``training_kind``); a learner that cannot train is refused
    with a one-line fix unless ``trainer.steps=0`` (a run that only tests it, e.g. IM-PT)."""
    from medmeta.learners.base import check_trainable

    factory = learner_class(cfg.learner)
    if int(cfg.trainer.steps) == 0:
        return getattr(factory, "training_kind", None)
    return check_trainable(factory, learner_name(cfg.learner))


# training ---------------------------------------------------------------------------------------
def run_training(cfg: Any) -> dict[str, Any]:
    """Meta-train (episodic learners) or pre-train (``mm_pt``), then test the best checkpoint.

    Returns the final metrics (also written to ``final_metrics.json`` by rank 0).
    """
    from medmeta.training.distributed import broadcast_object, init_distributed
    from medmeta.training.loggers import MetricLogger
    from medmeta.training.loop import EpisodicObjective, PretrainObjective, TrainingLoop

    cfg = _as_config(cfg)
    _check_common(cfg)
    _check_trainer(cfg)
    apply_num_threads(cfg.trainer.get("num_threads"), workers=int(cfg.trainer.num_workers), name="trainer.num_threads")
    kind = _training_kind(cfg)  # refuses a learner it cannot train before any work
    data = resolve_data_config(cfg.data, cfg.backbone)
    protocol = build_protocol(cfg.protocol) if cfg.trainer.test else None
    ctx = init_distributed(str(cfg.trainer.device), str(cfg.trainer.dist_backend))
    logger = None
    folder_lock = ExitStack()
    try:
        run_dir = resolve_run_dir(cfg)
        main_dir = broadcast_object(str(run_dir), ctx)
        if ctx.enabled and Path(main_dir).resolve() != run_dir.resolve():
            raise ConfigError(
                f"rank {ctx.rank} writes to {run_dir} but rank 0 to {main_dir}: give every rank the same run "
                f"folder (hydra.run.dir=... or run_dir=...), see docs/distributed.md"
            )
        if ctx.is_main:  # a second run on this folder stops here, naming this one
            folder_lock.enter_context(hold_folder(run_dir))
        seed = int(cfg.trainer.seed)
        seed_everything(seed)
        meta_dataset = open_meta_dataset(data)
        need = ["train"] + (["test"] if cfg.trainer.test else [])
        plan = plan_tasks(meta_dataset, data.train, data.val, data.test, target=data.target, need=need)
        name = learner_name(cfg.learner)
        pretraining = kind == "pretraining"

        backbone = build_backbone(cfg.backbone)
        train_sources = _learner_tasks(meta_dataset, plan.train, "train") if pretraining else []
        learner = build_learner(
            cfg.learner, backbone, tasks=[s.description for s in train_sources] if pretraining else None
        )
        test_learner_cfg = cfg.get("test_learner")
        if test_learner_cfg is not None:  # validate its arguments now, on a throwaway backbone copy
            build_learner(test_learner_cfg, copy.deepcopy(backbone), where="test_learner")
        learner.to(ctx.device)

        objective: "PretrainObjective | EpisodicObjective | None" = None
        if kind is None:  # trainer.steps=0 (IM-PT, linear probe): nothing to train, the learner is only tested
            pass
        elif pretraining:
            from medmeta.learners import MixedBatchSampler

            batch_sampler = MixedBatchSampler(
                train_sources,
                batch_size=int(cfg.trainer.batch_size),
                seed=seed,
                sampling=_mixed_sampling(str(cfg.sampler.weighting)),
            )
            val_split = str(data.val.split)
            val_keys = set(plan.val)
            val_heads = [(i, meta_dataset.source(d, t, split=val_split)) for i, (d, t) in enumerate(plan.train) if (d, t) in val_keys]
            if not val_heads and int(cfg.trainer.val_episodes) > 0:
                log.warning("mm_pt: no training task is among the validation tasks: no validation, no early stopping")
            objective = PretrainObjective(
                learner, batch_sampler, ctx, seed, val_heads=val_heads if int(cfg.trainer.val_episodes) > 0 else [],
                val_max_items=int(cfg.trainer.val_max_items),
            )
        else:
            sampler = build_train_sampler(meta_dataset, plan.train, cfg.sampler, seed)
            val_specs: list[Any] = []
            if plan.val and int(cfg.trainer.val_episodes) > 0:
                val_sampler = build_val_sampler(meta_dataset, plan.val, cfg.sampler, seed, split=str(data.val.split))
                val_specs = val_sampler.specs(int(cfg.trainer.val_episodes))
            objective = EpisodicObjective(
                learner,
                sampler,
                meta_dataset,
                int(cfg.trainer.meta_batch_size),
                ctx,
                seed,
                val_specs=val_specs,
                num_workers=int(cfg.trainer.num_workers),
            )
        if protocol is not None and ctx.is_main:
            _check_protocol_feasible(meta_dataset, plan.test, protocol)

        plain_cfg = to_plain(cfg)
        loop, resume_path = None, None
        if objective is not None:
            optimizer = build_optimizer(cfg.trainer, list(learner.parameters()))
            scheduler = build_scheduler(cfg.trainer, optimizer)
            fingerprint = training_fingerprint(cfg, learner, plan, data)
            resume_path = find_resume_checkpoint(cfg, run_dir)
            loop = TrainingLoop(
                learner, objective, optimizer, scheduler, cfg.trainer, ctx, run_dir,
                fingerprint=fingerprint, backbone=backbone, config=plain_cfg,
            )
            if resume_path is not None:
                step = loop.resume(resume_path)  # checks the fingerprint before anything else happens
                if ctx.is_main:
                    log.info("resuming from %s at step %d", resume_path, step)
        if ctx.is_main:
            _write_config(run_dir / "config.yaml", cfg)
            write_json_atomic(run_dir / "tasks.json", plan.to_dict())
        logger = MetricLogger(
            run_dir,
            list(cfg.logger.backends),
            enabled=ctx.is_main,
            resume_step=loop.step if loop is not None and resume_path is not None else None,
            wandb={k: to_plain(v) for k, v in cfg.logger.wandb.items()},
            config=plain_cfg,
        )
        final: dict[str, Any] = {
            "run_dir": str(run_dir),
            "learner": name,
            "steps_done": 0,
            "stopped_early": False,
            "monitor": str(cfg.trainer.monitor),
            "best_metric": None,
            "best_step": 0,
            "resumed_from_step": None,
            "world_size": ctx.world_size,
            "backbone": {"name": str(cfg.backbone.name), "weights": getattr(backbone, "weights_origin", None)},
        }
        if loop is not None:
            loop.logger = logger
            result = loop.fit()
            final.update(steps_done=result.steps_done, stopped_early=result.stopped_early, best_metric=result.best_metric,
                         best_step=result.best_step, resumed_from_step=result.resumed_from_step)
        ctx.shutdown()  # no collectives after training: rank 0 tests alone
        if not ctx.is_main:
            return final
        if protocol is not None:
            test = _test_best(cfg, loop, learner, backbone, meta_dataset, plan, protocol, run_dir, ctx.device)
            final["test"] = test["summary"]
            logger.log({f"test/{protocol.primary_metric}": test["summary"]["methods"][test["method"]]["mean_over_tasks"]},
                       final["steps_done"])
            print(test["table"], flush=True)
        write_json_atomic(run_dir / "final_metrics.json", final)
        return final
    finally:
        if logger is not None:
            logger.close()
        ctx.shutdown()
        folder_lock.close()


def _test_best(cfg: DictConfig, loop: Any, learner: Any, backbone: torch.nn.Module, meta_dataset: Any, plan: TaskPlan,
               protocol: Any, run_dir: Path, device: Any) -> dict[str, Any]:
    """Load the best checkpoint (when there was training) and run the protocol on the test tasks."""
    from medmeta.evaluation.protocols import run_protocol
    from medmeta.training.checkpoint import load_checkpoint

    if loop is not None:
        best = load_checkpoint(loop.best_path)
        learner.load_state_dict(best["model"])
    test_cfg = cfg.get("test_learner")
    if test_cfg is not None:
        tester = build_learner(test_cfg, backbone, where="test_learner")
        method = learner_name(test_cfg)
    else:
        tester = learner
        method = learner_name(cfg.learner)
    tester.to(device)
    df = run_protocol({method: tester}, meta_dataset, plan.test, protocol, out_dir=run_dir / "test", device=device,
                      progress=bool(cfg.trainer.progress))
    return {"method": method, "summary": protocol_summary(df, protocol), "table": results_table(df, protocol)}


# evaluation -------------------------------------------------------------------------------------
def _checkpoint_path(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"checkpoint={text}: the folder has no checkpoints/best.pt")
    if not path.is_file():
        raise ConfigError(
            f"checkpoint={text}: no such file (expected a medmeta checkpoint: a run's best.pt / last.pt, a run "
            f"folder, or a file written by medmeta.learners.save_learner)"
        )
    return path


def run_evaluation(cfg: Any) -> pd.DataFrame:
    """Evaluate ``cfg.learners`` under ``cfg.protocol`` on the test tasks; print the table.

    With ``cfg.checkpoint``, learners of the checkpoint's method load its full state and the
    others its backbone (``checkpoint_load``); the backbone architecture then comes from the
    checkpoint (its run's config, or the architecture record of a ``save_learner`` file). Returns the tidy results (also ``results.csv`` in the run folder).
    """
    from medmeta.training.distributed import resolve_device

    cfg = _as_config(cfg)
    _check_common(cfg)
    apply_num_threads(cfg.get("num_threads"), name="num_threads")
    if not cfg.learners:
        raise ConfigError("learners: no learner to evaluate; add one with +learner@learners.<name>=<option>")
    if cfg.checkpoint_load not in ("auto", "backbone", "learner"):
        raise ConfigError(f"checkpoint_load: expected auto, backbone or learner, got {cfg.checkpoint_load!r}")
    device = resolve_device(str(cfg.device))
    run_dir = resolve_run_dir(cfg)
    with hold_folder(run_dir):  # a second run on this folder stops here, naming this one
        return _run_evaluation(cfg, run_dir, device)


def _run_evaluation(cfg: DictConfig, run_dir: Path, device: Any) -> pd.DataFrame:
    from medmeta.evaluation.protocols import run_protocol
    from medmeta.training.checkpoint import checkpoint_backbone, load_checkpoint, restore_learner

    seed_everything(int(cfg.seed))

    ckpt = None
    backbone_cfg = cfg.backbone
    data_cfg = cfg.data
    if cfg.checkpoint:
        ckpt_path = _checkpoint_path(str(cfg.checkpoint))
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt.get("config") or {}
        saved_backbone = checkpoint_backbone(ckpt, ckpt_path)  # its run's config, else its architecture record
        keep: dict[Any, Any] = {k: v for k, v in saved_backbone.items() if k in cfg.backbone}
        backbone_cfg = OmegaConf.merge(cfg.backbone, {**keep, "pretrained": None})
        if to_plain(cfg.backbone)["name"] != saved_backbone.get("name"):
            log.info("checkpoint: using its backbone %s instead of backbone.name=%s", saved_backbone.get("name"), cfg.backbone.name)
        if str(cfg.data.get("normalize")) == "auto":  # read images as the checkpoint's run did
            from medmeta.training.components import resolve_normalize

            saved_data = saved.get("data") or {}
            normalize = resolve_normalize(saved_data.get("normalize", "auto"), saved_backbone)
            data_cfg = OmegaConf.merge(cfg.data, {"normalize": normalize})
    data = resolve_data_config(data_cfg, backbone_cfg)
    meta_dataset = open_meta_dataset(data)
    plan = plan_tasks(meta_dataset, data.train, data.val, data.test, target=data.target, need=("test",))
    protocol = build_protocol(cfg.protocol)
    _check_protocol_feasible(meta_dataset, plan.test, protocol)
    learners: dict[str, Any] = {}
    weights_origin = None
    for method, lcfg in cfg.learners.items():
        backbone = build_backbone(backbone_cfg)
        weights_origin = f"checkpoint {cfg.checkpoint}" if ckpt is not None else getattr(backbone, "weights_origin", None)
        learner = build_learner(lcfg, backbone, where=f"learners.{method}")
        if ckpt is not None:
            mode = str(cfg.checkpoint_load)
            if mode == "auto":  # the whole state for the checkpoint's own method, else its backbone
                saved_name = learner_name((ckpt.get("config") or {}).get("learner", {"name": ""}))
                same = (learner_name(lcfg) == saved_name if saved_name
                        else type(learner).__name__ == ckpt["architecture"].get("learner"))
                mode = "learner" if same else "backbone"
            restore_learner(ckpt, learner, backbone, mode, where=f"learners.{method}", source=f"checkpoint={cfg.checkpoint}")
        learners[str(method)] = learner.to(device)
    _write_config(run_dir / "config.yaml", cfg)
    write_json_atomic(run_dir / "tasks.json", {"test": [f"{d}/{t}" for d, t in plan.test]})
    df = run_protocol(learners, meta_dataset, plan.test, protocol, out_dir=run_dir, device=device,
                      progress=bool(cfg.progress))
    header = (f"data: {cfg.data.name} ({len(plan.test)} test task(s)); backbone: {backbone_cfg.name} "
              f"(weights: {weights_origin}); run folder: {run_dir}")
    table = header + "\n" + results_table(df, protocol)
    summary = protocol_summary(df, protocol)
    summary["backbone"] = {"name": str(backbone_cfg.name), "weights": weights_origin}
    summary["data"] = str(cfg.data.name)
    write_json_atomic(run_dir / "final_metrics.json", summary)
    from medmeta.io import write_bytes_atomic

    write_bytes_atomic(run_dir / "results_table.txt", (table + "\n").encode("utf-8"))
    print(table, flush=True)
    return df
