"""Train a model with an objective through the one :class:`~medmeta.training.loop.TrainingLoop`,
in one process, from Python.

The Hydra app (:func:`medmeta.training.run.run_training`) and the adapters' trainers
(segmentation ``meta_train``, slide MIL heads, cell detectors) share the loop, and with it
atomic checkpoints, exact resume, ``metrics.csv`` and early stopping. :func:`fit` is what the
adapters call: it holds the run folder (a temporary one when none is given), the resume rule
(:func:`resume_checkpoint`, the one the app uses too) and the logger, so no trainer writes its
own.
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from medmeta.errors import ConfigError
from medmeta.modes import module_mode
from medmeta.training.checkpoint import model_fingerprint
from medmeta.training.distributed import DistributedContext
from medmeta.training.loggers import MetricLogger
from medmeta.training.loop import TrainingLoop, TrainResult

__all__ = ["LoopSettings", "fit", "resume_checkpoint"]

Report = Callable[[Mapping[str, float], int], None]
"""Called with every logged row of metrics and its step (e.g. to print progress)."""


@dataclass(frozen=True)
class LoopSettings:
    """The ``trainer`` settings that :class:`~medmeta.training.loop.TrainingLoop` reads, for
    callers without a Hydra ``trainer`` config. Validation runs every ``val_every`` steps when
    the objective has validation data; ``monitor`` / ``monitor_mode`` pick the best checkpoint
    and, with ``patience``, stop early."""

    steps: int
    checkpoint_every: int
    val_every: int
    log_every: int = 1
    grad_clip: Optional[float] = None
    progress: bool = False
    patience: Optional[int] = None
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    min_delta: float = 0.0

    @classmethod
    def for_steps(
        cls,
        steps: int,
        *,
        checkpoint_every: Optional[int] = None,
        log_every: Optional[int] = None,
        val_every: Optional[int] = None,
        grad_clip: Optional[float] = None,
        **rest: Any,
    ) -> "LoopSettings":
        """Settings for ``steps`` steps; by default checkpoint and validate at the end only and
        log every step (``None`` or ``0`` means the default)."""
        steps = int(steps)
        return cls(
            steps=steps,
            checkpoint_every=max(1, int(checkpoint_every) if checkpoint_every else steps),
            val_every=max(1, int(val_every) if val_every else steps),
            log_every=max(1, int(log_every) if log_every else 1),
            grad_clip=float(grad_clip) if grad_clip else None,
            **rest,
        )


def resume_checkpoint(
    run_dir: "str | Path", resume: Optional[bool], option: str = "resume", hint: str = ""
) -> Optional[Path]:
    """The checkpoint a run in ``run_dir`` continues from: ``resume=None`` continues from
    ``checkpoints/last.pt`` when it exists (a requeued job goes on), ``True`` requires it,
    ``False`` starts afresh (warning that it will be overwritten). ``option`` and ``hint`` name
    the setting in error messages."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if resume is True and not last.is_file():
        raise ConfigError(f"{option}=true but {last} does not exist" + (f"; {hint}" if hint else ""))
    if resume is False:
        if last.is_file():
            warnings.warn(f"{option}=false: starting fresh; {last} will be overwritten", stacklevel=3)
        return None
    return last if last.is_file() else None


class _ReportingLogger(MetricLogger):
    """A :class:`MetricLogger` that also hands every logged row to ``report``."""

    def __init__(self, run_dir: Path, backends: Sequence[str], enabled: bool, resume_step: Optional[int],
                 report: Optional[Report]) -> None:
        super().__init__(run_dir, backends=tuple(backends), enabled=enabled, resume_step=resume_step)
        self.report = report

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        super().log(metrics, step)
        if self.report is not None:
            self.report(metrics, step)


@contextmanager
def _run_folder(run_dir: "str | Path | None") -> Iterator[Path]:
    if run_dir is not None:
        from medmeta.locks import hold

        path = Path(run_dir).expanduser()
        with hold(path):  # a second trainer on this folder stops, naming this one
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="medmeta-fit-") as tmp:
        yield Path(tmp)


def fit(
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    fingerprint: Mapping[str, Any],
    device: "torch.device | str | None" = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    run_dir: "str | Path | None" = None,
    resume: Optional[bool] = None,
    loggers: Sequence[str] = ("csv",),
    report: Optional[Report] = None,
) -> TrainResult:
    """Train ``model`` for ``settings.steps`` steps of ``objective`` in this process.

    Args:
        fingerprint: plain values a checkpoint must match to be resumed (the model's parameter
            shapes are added here); stored with every checkpoint, with ``settings``.
        device: the model's device (default: that of its first parameter).
        run_dir: the run folder (``checkpoints/last.pt`` every ``settings.checkpoint_every``
            steps and at the end, ``checkpoints/best.pt``, ``metrics.csv``); ``None`` trains in a
            temporary folder that is removed afterwards (nothing to resume from, no logs).
        resume: see :func:`resume_checkpoint`.
        loggers: metric backends (``csv``, ``tensorboard``, ``wandb``) when there is a run folder.
        report: called with every logged row and its step.

    The train/eval mode of every module is restored afterwards (the loop trains in train mode).
    """
    if int(settings.steps) < 0:
        raise ConfigError(f"steps: expected >= 0, got {settings.steps}")
    if run_dir is None and resume:
        raise ConfigError("resume=True needs run_dir: the run folder whose checkpoints/last.pt to continue")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ctx = DistributedContext(device=torch.device(device))
    with module_mode(model), _run_folder(run_dir) as folder:
        loop = TrainingLoop(
            model, objective, optimizer, scheduler, settings, ctx, folder,
            fingerprint={**fingerprint, "model_shapes": model_fingerprint(model)},
            config={**fingerprint, **vars(settings)},
        )
        resume_from = resume_checkpoint(folder, resume) if run_dir is not None else None
        if resume_from is not None:
            loop.resume(resume_from)  # checks the fingerprint before anything else happens
        logger = _ReportingLogger(folder, loggers, run_dir is not None,
                                  loop.step if resume_from is not None else None, report)
        loop.logger = logger
        try:
            return loop.fit()
        finally:
            logger.close()
