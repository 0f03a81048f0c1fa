"""Supervised mini-batch training of slide models (MIL heads, cell detectors) through the one loop.

:class:`BatchObjective` is the objective that :class:`~medmeta.training.loop.TrainingLoop`
drives for :func:`~medmeta.adapters.slides.mil.train_mil` and
:func:`~medmeta.adapters.slides.detection.detector.train_detector`: shuffled mini-batches of a
fixed list of items, a new order each epoch drawn from one seeded ``torch.Generator``. Its
state (epoch, position in the epoch, the epoch's order, the generator state and the per-step
records) goes into every checkpoint, so a resumed run takes exactly the batches the
interrupted one would have taken. Per-item randomness (instance subsampling, augmentation)
belongs to the dataset, seeded by ``(seed, epoch, index)`` through ``set_epoch``, so it does
not depend on where a run was resumed either.

:func:`fit_single_process` runs a model, an objective, an optimiser and a schedule through a
single-process :class:`~medmeta.training.loop.TrainingLoop`. With a ``run_dir`` the run
writes ``checkpoints/last.pt`` (atomically, every ``checkpoint_every`` steps and at the end),
``checkpoints/best.pt`` and ``metrics.csv``, and a later call with the same folder resumes
from ``last.pt``; without one it trains in a temporary folder that is deleted afterwards.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medmeta.errors import ConfigError, MissingDataError
from medmeta.training.checkpoint import model_fingerprint
from medmeta.training.distributed import DistributedContext
from medmeta.training.loggers import MetricLogger
from medmeta.training.loop import TrainingLoop, TrainResult, episode_seed

__all__ = ["BatchObjective", "fit_single_process", "LossFn"]

LossFn = Callable[[Any], "tuple[Tensor, dict[str, float]]"]
"""``loss_fn(batch) -> (loss, extra)``: the mean loss of a collated batch (a 0-dim tensor with a
graph) and extra floats recorded with it (e.g. the parts of a detector's loss)."""


class BatchObjective:
    """Shuffled mini-batches of ``dataset`` for :class:`~medmeta.training.loop.TrainingLoop`.

    Each epoch draws ``torch.randperm(len(dataset), generator=g)`` from one generator seeded
    with ``seed`` and cuts it into batches of ``batch_size`` (the last one shorter, or dropped
    with ``drop_last``). A step collates the next batch (``dataset[i]`` through a DataLoader
    with ``num_workers`` workers), computes ``loss_fn(batch)`` and back-propagates it.
    Single process only: TrainingLoop's gradient all-reduce would sum identical batches.

    Args:
        dataset: items ``dataset[i]``; an optional ``set_epoch(epoch)`` is called before each
            epoch's items are read (new per-item random draws each pass).
        loss_fn: see :data:`LossFn`.
        batch_size: items per step.
        seed: seeds the epoch orders (and the DataLoader's worker seeds).
        drop_last: drop the last, shorter batch of each epoch.
        collate_fn: turns a list of items into a batch (DataLoader's default otherwise).
        num_workers: DataLoader worker processes reading items.
        on_start: called when training starts, after the loop has put the model in training
            mode (e.g. to keep batch-norm statistics frozen).
    """

    kind = "batches"

    def __init__(
        self,
        dataset: Any,
        loss_fn: LossFn,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        num_workers: int = 0,
        on_start: Optional[Callable[[], None]] = None,
    ) -> None:
        self.size = len(dataset)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_batches = self.size // self.batch_size if drop_last else math.ceil(self.size / self.batch_size)
        if self.num_batches < 1:
            raise ValueError(
                f"{self.size} items make no batch of {self.batch_size}" + (" with drop_last" if drop_last else "")
            )
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.on_start = on_start
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.batch = 0  # batches of this epoch already taken
        self.order: Optional[Tensor] = None  # this epoch's order; None before the first epoch
        self.records: list[dict[str, float]] = []
        self._iterator: Optional[Iterator[Any]] = None

    # data position ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (checkpoints load with ``weights_only=True``)."""
        return {
            "kind": self.kind,
            "epoch": int(self.epoch),
            "batch": int(self.batch),
            "order": self.order.clone() if self.order is not None else torch.empty(0, dtype=torch.int64),
            "generator": self.generator.get_state(),
            "records": [dict(r) for r in self.records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint data state is for {state.get('kind')!r} training, not {self.kind!r}")
        order = state["order"]
        if order.numel() and order.numel() != self.size:
            raise ValueError(f"checkpoint data state orders {order.numel()} items; this run has {self.size}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.order = order.clone().long() if order.numel() else None
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.records = [{str(k): float(v) for k, v in r.items()} for r in state["records"]]
        self._iterator = None

    def start(self) -> None:
        """Run ``on_start``; a run resumed mid-epoch reopens its loader at the saved position."""
        if self.on_start is not None:
            self.on_start()
        self._iterator = self._open() if self.order is not None and self.batch < self.num_batches else None

    def close(self) -> None:
        self._iterator = None

    def _open(self) -> Iterator[Any]:
        """A DataLoader over this epoch's remaining batches (worker seeds fixed by seed and epoch)."""
        assert self.order is not None
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        bs = self.batch_size
        batches = [self.order[k * bs : (k + 1) * bs].tolist() for k in range(self.batch, self.num_batches)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(episode_seed(self.seed, "batch-loader", self.epoch)),
        )
        return iter(loader)

    def _next_batch(self) -> tuple[Any, int]:
        if self.order is None or self.batch >= self.num_batches:
            if self.order is not None:
                self.epoch += 1
            self.order = torch.randperm(self.size, generator=self.generator)
            self.batch = 0
            self._iterator = None
        if self._iterator is None:
            self._iterator = self._open()
        count = min(self.batch_size, self.size - self.batch * self.batch_size)
        batch = next(self._iterator)
        self.batch += 1
        return batch, count

    # training ---------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """Back-propagate the next batch's loss; returns the loss sum and item count for logging."""
        batch, count = self._next_batch()
        loss, extra = self.loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {step} (epoch {self.epoch}): the training loss is {float(loss)} {extra or ''}; "
                f"lower the learning rate"
            )
        loss.backward()
        value = float(loss.detach())
        self.records.append({**extra, "loss": value, "epoch": float(self.epoch), "count": float(count)})
        return {"loss_sum": value * count, "count": float(count)}

    def validate(self) -> dict[str, float]:
        """No validation data: the loop keeps the last state as the best."""
        return {}

    def settings(self) -> dict[str, Any]:
        """What fixes the batches (part of the fingerprint a resumed run must match)."""
        return {"objective": self.kind, "items": self.size, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "seed": self.seed}

    def epoch_losses(self) -> list[float]:
        """The item-weighted mean loss of each epoch, in order (a partial last epoch included)."""
        totals: dict[int, list[float]] = {}
        for r in self.records:
            total = totals.setdefault(int(r["epoch"]), [0.0, 0.0])
            total[0] += r["loss"] * r["count"]
            total[1] += r["count"]
        return [totals[e][0] / totals[e][1] for e in sorted(totals)]

    def step_records(self) -> list[dict[str, float]]:
        """One dict per step: ``loss`` and the extra values of ``loss_fn``."""
        return [{k: v for k, v in r.items() if k not in ("epoch", "count")} for r in self.records]


@dataclass(frozen=True)
class _LoopSettings:
    """The ``trainer`` settings TrainingLoop reads (no validation, no early stopping)."""

    steps: int
    checkpoint_every: int
    log_every: int
    val_every: int
    grad_clip: Optional[float] = None
    progress: bool = False
    patience: Optional[int] = None


class _ReportingLogger(MetricLogger):
    """``metrics.csv`` in the run folder (when there is one), and each logged row passed to ``report``."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: Optional[int],
        report: Optional[Callable[[Mapping[str, float], int], None]],
    ) -> None:
        super().__init__(run_dir, backends=("csv",), enabled=enabled, resume_step=resume_step)
        self.report = report

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        super().log(metrics, step)
        if self.report is not None:
            self.report(metrics, step)


@contextmanager
def _folder(run_dir: "str | Path | None") -> Iterator[Path]:
    if run_dir is not None:
        path = Path(run_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medmeta-fit-") as tmp:
        yield Path(tmp)


def fit_single_process(
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    device: torch.device,
    settings: Mapping[str, Any],
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    grad_clip: Optional[float] = None,
    run_dir: "str | Path | None" = None,
    resume: Optional[bool] = None,
    checkpoint_every: Optional[int] = None,
    log_every: Optional[int] = None,
    report: Optional[Callable[[Mapping[str, float], int], None]] = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` steps of ``objective`` with a single-process TrainingLoop.

    Nothing here is specific to :class:`BatchObjective`: any TrainingLoop objective whose
    ``validate`` returns ``{}`` works (no monitored metric, no early stopping; ``best.pt`` is the
    last state).

    Args:
        device: where the model lives (the loop's single-process context).
        settings: plain values a checkpoint must match to be resumed (with the model's parameter
            shapes, added here); they are stored with every checkpoint.
        grad_clip: clip the gradient norm of the parameters that require grad (None: no clipping).
        run_dir: the run folder (``checkpoints/``, ``metrics.csv``); None trains in a temporary
            folder that is removed afterwards (nothing to resume from).
        resume: as ``trainer.resume``: None continues from ``run_dir/checkpoints/last.pt`` when it
            exists, True requires it, False starts afresh (overwriting it).
        checkpoint_every: steps between checkpoints of ``last.pt`` (default: only at the end).
        log_every: steps between logged rows of ``train/loss`` (default: every step).
        report: called with each logged row and its step (e.g. to print progress).
    """
    steps = int(steps)
    if steps < 0:
        raise ConfigError(f"steps: expected >= 0, got {steps}")
    if run_dir is None and resume:
        raise ConfigError("resume=True needs run_dir: the run folder whose checkpoints/last.pt to continue")
    loop_settings = _LoopSettings(
        steps=steps,
        checkpoint_every=max(1, int(checkpoint_every) if checkpoint_every else steps),
        log_every=max(1, int(log_every) if log_every else 1),
        val_every=max(1, steps),
        grad_clip=float(grad_clip) if grad_clip else None,
    )
    plain = dict(settings)
    fingerprint = {**plain, "model_shapes": model_fingerprint(model)}
    ctx = DistributedContext(device=torch.device(device))
    with _folder(run_dir) as folder:
        loop = TrainingLoop(
            model, objective, optimizer, scheduler, loop_settings, ctx, folder,
            fingerprint=fingerprint, config={**plain, "steps": steps},
        )
        last = loop.last_path
        if resume is True and not last.is_file():
            raise MissingDataError(f"resume=True but {last} does not exist; pass resume=None to start when it is absent")
        if resume is False and last.is_file():
            warnings.warn(f"resume=False: starting afresh; {last} will be overwritten", stacklevel=3)
        resumed = resume is not False and last.is_file()
        if resumed:
            loop.resume(last)  # checks the fingerprint before anything else happens
        logger = _ReportingLogger(folder, run_dir is not None, loop.step if resumed else None, report)
        loop.logger = logger
        try:
            return loop.fit()
        finally:
            logger.close()
