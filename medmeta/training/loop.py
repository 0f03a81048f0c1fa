"""The training loop: meta-training on episodes, or multi-task pre-training (mm-PT).

:class:`TrainingLoop` owns what both kinds of training share: the optimiser and scheduler,
explicit gradient all-reduce across ranks, validation every ``val_every`` steps, the best
checkpoint by a validation metric, early stopping, periodic atomic checkpoints that resume
exactly, metric logging and a progress bar (rank 0 only). What a step and a validation round
*are* comes from an objective:

* :class:`EpisodicObjective`: a meta-batch of episodes from an
  :class:`~medmeta.episodes.EpisodeStream` sharded by rank (global episode ``k`` goes to rank
  ``k % world_size``). The learner gets this rank's whole share of the meta-batch in one
  :meth:`~medmeta.learners.base.Learner.meta_backward` call with ``scale = 1 / meta_batch_size``
  (global), so the summed gradient over ranks equals one process's gradient on the same
  meta-batch, and the learner chooses how to spend memory: MAML with ``vmap=True`` batches the
  tasks, others accumulate task by task with one graph alive at a time. The call runs under a
  torch seed derived from the run seed and the rank's first episode number of the step (so a
  resumed run is bit-identical); learners that go task by task enter a per-episode seed (run
  seed, episode number) around each task, so a stochastic learner (dropout) draws the same
  numbers for an episode on any rank.
* :class:`PretrainObjective`: mixed-task batches (:class:`~medmeta.learners.MixedBatchSampler`),
  each rank taking every ``world_size``-th example of the global batch.

The state of the data stream (next episode, or epoch and batch) is part of every checkpoint;
with counter-based episode RNG the resumed run sees exactly the episodes the interrupted run
would have seen.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from medmeta.errors import CheckpointError, ConfigError
from medmeta.learners.base import Learner
from medmeta.learners.state import learner_checkpoint
from medmeta.modes import module_mode
from medmeta.tasks import Episode
from medmeta.training.checkpoint import (
    atomic_torch_save,
    backbone_state_dict,
    capture_rng_state,
    check_compatible,
    find_backbone_prefix,
    load_checkpoint,
    restore_rng_state,
)
from medmeta.training.distributed import (
    DistributedContext,
    all_reduce_gradients,
    all_reduce_sum,
    average_buffers,
    broadcast_module,
)
from medmeta.training.early_stopping import EarlyStopping
from medmeta.training.loggers import MetricLogger

if TYPE_CHECKING:
    from medmeta.learners.pretrain import MultiTaskPretrainer

__all__ = ["TrainingLoop", "TrainResult", "Objective", "EpisodicObjective", "PretrainObjective", "episode_seed"]


def episode_seed(seed: int, *parts: Any) -> int:
    """The torch seed of one unit of work (an episode, a batch): stable across processes."""
    from medmeta.evaluation.protocols import derive_seed

    return derive_seed(seed, *parts)


class _SeededRNG:
    """Run a block under a fixed torch seed, restoring the caller's RNG state afterwards."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = int(seed)
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


# objectives -----------------------------------------------------------------------------------
class Objective(Protocol):
    """What :class:`TrainingLoop` needs from a kind of training: a step, a validation round and
    the position of its data stream (saved in every checkpoint, so a resumed run sees the same data)."""

    kind: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def train_step(self, step: int) -> dict[str, float]:
        """Accumulate this rank's gradient of one step; returns ``{"loss_sum", "count"}``."""
        ...

    def validate(self) -> dict[str, float]:
        """Validation metrics (all ranks take part); ``{}`` when there is nothing to validate."""
        ...


class EpisodicObjective:
    """Meta-training on episodes: ``learner.meta_backward(episodes, scale)`` per step.

    Args:
        learner: an episodic :class:`~medmeta.learners.base.Learner` (``training_kind == "episodic"``).
        sampler: the training sampler (``.sample(k)``), e.g. a MultiDomainSampler.
        sources: where images are read (the meta-dataset).
        meta_batch_size: episodes per step, over all ranks (a multiple of the world size).
        ctx: the distributed context.
        seed: the run seed (per-episode torch seeds derive from it).
        val_specs: fixed validation episodes (EpisodeSpecs), sharded by rank at validation.
        val_sources: where validation images are read.
        num_workers: DataLoader workers materialising training episodes.
    """

    kind = "episodic"

    def __init__(
        self,
        learner: Learner,
        sampler: Any,
        sources: Any,
        meta_batch_size: int,
        ctx: DistributedContext,
        seed: int,
        val_specs: Sequence[Any] = (),
        val_sources: Any = None,
        num_workers: int = 0,
        val_metrics: Sequence[str] = ("auroc", "accuracy"),
    ) -> None:
        from medmeta.episodes import EpisodeStream

        if learner.training_kind != "episodic":
            raise ConfigError(
                f"{type(learner).__name__} is not trained on episodes (training_kind={learner.training_kind!r})"
            )
        if meta_batch_size < 1:
            raise ConfigError(f"trainer.meta_batch_size: expected >= 1, got {meta_batch_size}")
        if meta_batch_size % ctx.world_size:
            raise ConfigError(
                f"trainer.meta_batch_size={meta_batch_size} is not a multiple of the world size "
                f"{ctx.world_size}: every rank must take the same number of episodes per step"
            )
        self.learner = learner
        self.meta_batch_size = int(meta_batch_size)
        self.ctx = ctx
        self.seed = int(seed)
        self.per_rank = self.meta_batch_size // ctx.world_size
        self.stream = EpisodeStream(
            sampler, sources, start=0, rank=ctx.rank, world_size=ctx.world_size, batch_size=self.per_rank
        )
        self.num_workers = int(num_workers)
        self.val_specs = list(val_specs)
        self.val_sources = val_sources if val_sources is not None else sources
        self.val_metrics = tuple(val_metrics)
        self._iterator: Optional[Iterator[list[Episode]]] = None

    # data position
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint data state is for {state.get('kind')!r} training, not {self.kind!r}")
        self.stream.load_state_dict(dict(state["stream"]))
        self._iterator = None

    def start(self) -> None:
        """Open the episode DataLoader at the current stream position.

        The iterator is created here, eagerly, so the DataLoader draws its worker seed at a
        fixed point (before a resumed run restores its RNG state), not at the first step.
        """
        from torch.utils.data import DataLoader

        from medmeta.episodes import collate_episodes

        loader = DataLoader(
            self.stream,
            batch_size=self.stream.batch_size,
            collate_fn=collate_episodes,
            num_workers=self.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
        )
        self._iterator = iter(loader)

    def close(self) -> None:
        self._iterator = None

    def _next_batch(self) -> list[Episode]:
        if self._iterator is None:
            self.start()
        assert self._iterator is not None
        episodes = next(self._iterator)
        self.stream.mark_consumed(episodes)
        return episodes

    def train_step(self, step: int) -> dict[str, float]:
        """Accumulate this rank's meta-gradient for one step; returns loss sums for logging."""
        device = self.ctx.device
        episodes = [episode.to(device, non_blocking=True) for episode in self._next_batch()]
        numbers = [int(episode.info["episode"]) for episode in episodes]

        def episode_scope(episode: Episode) -> _SeededRNG:
            return _SeededRNG(episode_seed(self.seed, "train-episode", int(episode.info["episode"])), device)

        with _SeededRNG(episode_seed(self.seed, "train-step", numbers[0]), device):
            loss = self.learner.meta_backward(episodes, scale=1.0 / self.meta_batch_size, episode_scope=episode_scope)
        if not torch.isfinite(loss):
            named = ", ".join(
                f"{n} ({e.info.get('dataset_id')}/{e.info.get('task_name')})" for n, e in zip(numbers, episodes)
            )
            raise FloatingPointError(
                f"step {step}: the meta-loss of episode(s) {named} is {float(loss)}; "
                f"lower trainer.lr or the learner's inner_lr"
            )
        return {"loss_sum": float(loss) * len(episodes), "count": float(len(episodes))}

    def validate(self) -> dict[str, float]:
        """Mean metrics over the fixed validation episodes (sharded by rank, summed across)."""
        from medmeta.episodes.provider import SourceProvider
        from medmeta.evaluation.protocols import ProtocolConfig, evaluate_episodes

        if not self.val_specs:
            return {}
        mine = [s for i, s in enumerate(self.val_specs) if i % self.ctx.world_size == self.ctx.rank]
        config = ProtocolConfig(
            name="validation", metrics=self.val_metrics, primary_metric=self.val_metrics[0], on_insufficient="skip"
        )
        provider = SourceProvider(self.val_sources)
        by_task: dict[tuple[str, str, str], list[Any]] = {}
        for spec in mine:
            by_task.setdefault((spec.dataset_id, spec.task_name, spec.split), []).append(spec)
        sums = {m: 0.0 for m in self.val_metrics}
        counts = {m: 0.0 for m in self.val_metrics}
        for (dataset_id, task_name, split), specs in by_task.items():
            source = provider.get(dataset_id, task_name, split or None)
            for row in evaluate_episodes(self.learner, source, specs, config, device=self.ctx.device):
                for m in self.val_metrics:
                    value = row.get(m)
                    if value is not None and not math.isnan(float(value)):
                        sums[m] += float(value)
                        counts[m] += 1.0
        keys = list(self.val_metrics)
        totals = all_reduce_sum([sums[m] for m in keys] + [counts[m] for m in keys], self.ctx)
        out = {}
        for i, m in enumerate(keys):
            n = totals[len(keys) + i]
            out[f"val/{m}"] = totals[i] / n if n else float("nan")
        out["val/episodes"] = float(len(self.val_specs))
        return out


class PretrainObjective:
    """Multi-task supervised pre-training (mm-PT) on mixed-task batches.

    Each step takes the next global batch of the :class:`~medmeta.learners.MixedBatchSampler`
    epoch order (seeded by ``(seed, epoch)``); rank ``r`` takes rows ``r, r + W, ...`` and scales
    its mean loss by its share, so the all-reduced gradient is the gradient of the global batch
    mean. Validation: per training task with a validation split, the AUROC of its head on up
    to ``val_max_items`` items of that split (a fixed seeded subset), averaged over tasks.

    Args:
        model: a :class:`~medmeta.learners.MultiTaskPretrainer` (``loss``, ``backbone``, ``heads``).
        batch_sampler: the :class:`~medmeta.learners.MixedBatchSampler` of the training tasks.
        val_heads: ``(head index, validation TaskSource)`` pairs.
    """

    kind = "pretrain"

    def __init__(
        self,
        model: MultiTaskPretrainer,
        batch_sampler: Any,
        ctx: DistributedContext,
        seed: int,
        val_heads: Sequence[tuple[int, Any]] = (),
        val_max_items: int = 512,
        val_batch_size: int = 256,
    ) -> None:
        self.model = model
        self.batches = batch_sampler
        self.ctx = ctx
        self.seed = int(seed)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._epoch_pairs: Optional[list[np.ndarray]] = None
        self.val_heads = [(int(i), s) for i, s in val_heads]
        self.val_max_items = int(val_max_items)
        self.val_batch_size = int(val_batch_size)
        if self.val_max_items < 1:
            raise ConfigError(f"val_max_items: expected >= 1, got {val_max_items}")
        self._val_positions = [self._val_subset(i, s) for i, s in self.val_heads]

    def _val_subset(self, index: int, source: Any) -> np.ndarray:
        n = len(source)
        if n <= self.val_max_items:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7919, index])
        return np.sort(rng.choice(n, size=self.val_max_items, replace=False)).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": int(self.epoch), "batch": int(self.batch_in_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint data state is for {state.get('kind')!r} training, not {self.kind!r}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch"])
        self._epoch_pairs = None

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _pairs(self) -> list[np.ndarray]:
        if self._epoch_pairs is None:
            # the same order MixedBatchSampler.__iter__ gives for this epoch
            self._epoch_pairs = self.batches._index_batches(np.random.default_rng([self.batches.seed, self.epoch]))
        return self._epoch_pairs

    def train_step(self, step: int) -> dict[str, float]:
        pairs_list = self._pairs()
        while self.batch_in_epoch >= len(pairs_list):
            self.epoch, self.batch_in_epoch, self._epoch_pairs = self.epoch + 1, 0, None
            pairs_list = self._pairs()
        pairs = pairs_list[self.batch_in_epoch]
        self.batch_in_epoch += 1
        mine = pairs[self.ctx.rank :: self.ctx.world_size]
        total = len(pairs)
        if len(mine) == 0:
            return {"loss_sum": 0.0, "count": 0.0}
        batch = [part.to(self.ctx.device, non_blocking=True) for part in self.batches.batch(mine)]
        with _SeededRNG(episode_seed(self.seed, "pretrain-batch", step, self.ctx.rank), self.ctx.device):
            loss = self.model.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the pre-training loss is {float(loss)}; lower trainer.lr")
            (loss * (len(mine) / total)).backward()
        return {"loss_sum": float(loss.detach()) * len(mine), "count": float(len(mine))}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from medmeta.episodes.labels import encode_labels
        from medmeta.evaluation.metrics import auroc

        if not self.val_heads:
            return {}
        total, count = 0.0, 0.0
        with module_mode(self.model, False):
            for j, ((head, source), positions) in enumerate(zip(self.val_heads, self._val_positions)):
                if j % self.ctx.world_size != self.ctx.rank or len(positions) == 0:
                    continue
                d = source.description
                logits = []
                for start in range(0, len(positions), self.val_batch_size):
                    images = source.read_images(positions[start : start + self.val_batch_size]).to(self.ctx.device)
                    if getattr(self.model.backbone, "in_chans", None) == 3 and images.shape[1] == 1:
                        images = images.expand(-1, 3, -1, -1)
                    logits.append(self.model.heads[head](self.model.backbone(images)).float().cpu())
                labels = encode_labels(np.asarray(source.labels)[positions], d, d)
                value = auroc(torch.cat(logits), labels, d.task_target)
                if not math.isnan(value):
                    total, count = total + value, count + 1
        total, count = all_reduce_sum([total, count], self.ctx)
        return {"val/auroc": total / count if count else float("nan"), "val/tasks": count}


# the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a finished (or early-stopped) training run reports."""

    steps_done: int
    stopped_early: bool
    best_metric: Optional[float]
    best_step: int
    last_checkpoint: Optional[Path]
    best_checkpoint: Optional[Path]
    resumed_from_step: Optional[int]
    history: list[dict[str, float]] = field(default_factory=list)


class TrainingLoop:
    """Optimise ``model`` with ``objective`` (see module doc).

    Args:
        model: the module whose parameters are trained and checkpointed (the learner).
        objective: an :class:`Objective`: :class:`EpisodicObjective`, :class:`PretrainObjective`, or an adapter's.
        optimizer, scheduler: from :mod:`medmeta.training.components`.
        trainer_cfg: the ``trainer`` config (steps, val_every, patience, checkpoint_every ...).
        ctx: distributed context (rank 0 writes, logs and shows progress).
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        logger: a :class:`MetricLogger` (created by the caller so resume can truncate it).
        fingerprint: what a checkpoint must match to be resumed (see
            :func:`medmeta.training.checkpoint.check_compatible`).
        backbone: the backbone module inside ``model``; ``best_backbone.pt`` is written from it.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_cfg: Any,
        ctx: DistributedContext,
        run_dir: "str | Path",
        logger: Optional[MetricLogger] = None,
        fingerprint: Optional[Mapping[str, Any]] = None,
        backbone: Optional[nn.Module] = None,
        config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = trainer_cfg
        self.ctx = ctx
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = logger
        self.fingerprint = dict(fingerprint or {})
        self.config = dict(config or {})
        self.backbone = backbone
        self.backbone_prefix = find_backbone_prefix(model, backbone)
        self.step = 0
        self.early = EarlyStopping(
            patience=getattr(trainer_cfg, "patience", None),
            mode=str(getattr(trainer_cfg, "monitor_mode", "max")),
            min_delta=float(getattr(trainer_cfg, "min_delta", 0.0)),
        )
        self.stopped_early = False
        self.resumed_from_step: Optional[int] = None
        self._pending_rng: Optional[Mapping[str, Any]] = None
        self._validated_at: Optional[int] = None
        # the training loss summed since the last logged row (sum, count): checkpointed, so a run
        # resumed inside a log_every window logs the same rows as an uninterrupted one
        self._log_window = (0.0, 0.0)
        self.history: list[dict[str, float]] = []
        for name in ("steps", "val_every", "checkpoint_every", "log_every"):
            value = int(getattr(trainer_cfg, name))
            if value < (0 if name == "steps" else 1):
                raise ConfigError(f"trainer.{name}: expected {'>= 0' if name == 'steps' else '>= 1'}, got {value}")

    # checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def state(self) -> dict[str, Any]:
        """The learner's checkpoint plus everything needed to continue exactly (tensors and plain types only)."""
        state = learner_checkpoint(self.model, self.optimizer, self.scheduler, config=self.config, backbone=self.backbone)
        state.update(
            backbone_prefix=self.backbone_prefix,  # None without a backbone: no best_backbone.pt
            step=int(self.step),
            early_stopping=self.early.state_dict(),
            stopped_early=bool(self.stopped_early),
            data=self.objective.state_dict(),
            rng=capture_rng_state(),
            fingerprint=self.fingerprint,
            world_size=int(self.ctx.world_size),
            validated_at=-1 if self._validated_at is None else int(self._validated_at),
            log_window=[float(v) for v in self._log_window],
        )
        return state

    def save(self, path: Path, state: Optional[dict[str, Any]] = None) -> Path:
        """Write a checkpoint atomically (rank 0 only; other ranks return at once)."""
        if not self.ctx.is_main:
            return path
        return atomic_torch_save(state if state is not None else self.state(), path)

    def _save_best(self, state: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        atomic_torch_save(state, self.best_path)
        if self.backbone_prefix is not None:
            weights = backbone_state_dict(state["model"], self.backbone_prefix)
            atomic_torch_save(weights, self.ckpt_dir / "best_backbone.pt")

    def resume(self, path: "str | Path") -> int:
        """Load a checkpoint (checked against the fingerprint first) and continue from its step."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        if self.fingerprint:
            check_compatible(ckpt, self.fingerprint, path)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: the model weights do not fit this learner: {err}") from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.early.load_state_dict(ckpt["early_stopping"])
        self.stopped_early = bool(ckpt.get("stopped_early", False))
        self.objective.load_state_dict(ckpt["data"])
        self.step = int(ckpt["step"])
        validated = int(ckpt.get("validated_at", -1))
        self._validated_at = None if validated < 0 else validated
        window = ckpt.get("log_window") or (0.0, 0.0)
        self._log_window = (float(window[0]), float(window[1]))
        self._pending_rng = ckpt["rng"]
        self.resumed_from_step = self.step
        return self.step

    # running ----------------------------------------------------------------------------
    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        self.history.append({"step": float(step), **{k: float(v) for k, v in metrics.items()}})
        if self.logger is not None:
            self.logger.log(metrics, step)

    def _validate(self) -> Optional[float]:
        metrics = self.objective.validate()
        self._validated_at = self.step
        if not metrics:
            return None
        monitor = str(getattr(self.cfg, "monitor", "val/auroc"))
        if monitor not in metrics:
            raise ConfigError(f"trainer.monitor={monitor!r} is not a validation metric; validation gives {sorted(metrics)}")
        value = float(metrics[monitor])
        improved = self.early.update(value, self.step)
        self._log({**metrics, f"{monitor}_best": self.early.best if self.early.best is not None else float("nan")}, self.step)
        if improved:
            self._save_best(self.state())
        return value

    def fit(self) -> TrainResult:
        """Train until ``trainer.steps`` or early stopping; returns a :class:`TrainResult`."""
        cfg = self.cfg
        total = int(cfg.steps)
        val_every, ckpt_every, log_every = int(cfg.val_every), int(cfg.checkpoint_every), int(cfg.log_every)
        clip = getattr(cfg, "grad_clip", None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.resumed_from_step is None:
            broadcast_module(self.model, self.ctx)  # identical start on every rank
        self.model.train()
        self.objective.start()  # DataLoader workers draw their seeds now, before the RNG is restored
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        bar = None
        if self.ctx.is_main and bool(getattr(cfg, "progress", True)) and self.step < total and not self.stopped_early:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 30.0)
        (window_loss, window_count), t0 = self._log_window, time.perf_counter()
        try:
            while self.step < total and not self.stopped_early:
                self.optimizer.zero_grad(set_to_none=True)
                out = self.objective.train_step(self.step)
                all_reduce_gradients(params, self.ctx)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                average_buffers(self.model, self.ctx)
                self.step += 1
                loss_sum, count = all_reduce_sum([out["loss_sum"], out["count"]], self.ctx)
                window_loss, window_count = window_loss + loss_sum, window_count + count
                self._log_window = (window_loss, window_count)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}")
                if self.step % log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - t0
                    self._log(
                        {
                            "train/loss": window_loss / max(window_count, 1),
                            "train/lr": self.optimizer.param_groups[0]["lr"],
                            "train/items_per_s": window_count / max(elapsed, 1e-9),
                        },
                        self.step,
                    )
                    window_loss, window_count, t0 = 0.0, 0.0, time.perf_counter()
                    self._log_window = (0.0, 0.0)
                if self.step % val_every == 0 or self.step == total:
                    self._validate()
                    if self.early.should_stop:
                        self.stopped_early = True
                if self.step % ckpt_every == 0 or self.step == total or self.stopped_early:
                    self.save(self.last_path)
        finally:
            if bar is not None:
                bar.close()
            self.objective.close()
        if self._validated_at is None and self.early.best is None:
            self._validate()  # no validation round happened (e.g. steps=0): validate once
        if self.ctx.is_main and (self.early.best is None or not self.best_path.exists()):
            self._save_best(self.state())  # no validation data: the last state is the best
        self.ctx.barrier()
        return TrainResult(
            steps_done=self.step,
            stopped_early=self.stopped_early,
            best_metric=self.early.best,
            best_step=self.early.best_step,
            last_checkpoint=self.last_path if self.last_path.exists() else None,
            best_checkpoint=self.best_path if self.best_path.exists() else None,
            resumed_from_step=self.resumed_from_step,
            history=self.history,
        )
