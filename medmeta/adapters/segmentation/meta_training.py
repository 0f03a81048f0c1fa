"""Segmentation meta-training through the one training loop.

:func:`meta_train` (Adam on a segmentation learner's ``meta_loss``) runs
:class:`medmeta.training.loop.TrainingLoop` with a :class:`SegmentationObjective`, so it
checkpoints, resumes and logs as classification training does: ``run_dir/checkpoints/last.pt``
every ``checkpoint_every`` steps and at the end, ``run_dir/metrics.csv`` (``train/loss`` and,
with validation batches, ``val/loss``), and a run resumed from ``last.pt`` ends bit-identical to
an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from medmeta.errors import CheckpointError, ConfigError
from medmeta.training.fit import LoopSettings, fit

__all__ = ["SegmentationObjective", "meta_train", "EpisodeBatches"]

#: a callable returning a meta-batch of episodes, or an iterable of meta-batches
EpisodeBatches = Union[Callable[[], Sequence[Any]], Iterable[Sequence[Any]]]


class SegmentationObjective:
    """The :class:`~medmeta.training.loop.TrainingLoop` objective of segmentation meta-training.

    A step takes the next meta-batch, backpropagates ``learner.meta_loss(batch)`` and keeps its
    value. The data state (checkpointed with the model) is the number of meta-batches taken and
    the loss of every step. When training starts, an iterable source is iterated afresh and the
    batches already taken are skipped; a callable is called once per step, and resumes exactly
    when its randomness comes from torch's global RNG (which checkpoints save and restore).

    Args:
        learner: a module with ``meta_loss(episodes) -> Tensor``.
        episodes: see :data:`EpisodeBatches`.
        parameters: the trained parameters; gradients reaching the learner's other parameters
            are dropped, so gradient clipping sees the trained ones only.
        val_batches: fixed meta-batches; validation is their mean meta-loss (``val/loss``).
    """

    kind = "segmentation"

    def __init__(
        self,
        learner: nn.Module,
        episodes: EpisodeBatches,
        parameters: Sequence[Tensor],
        val_batches: Sequence[Sequence[Any]] = (),
    ) -> None:
        meta_loss = getattr(learner, "meta_loss", None)
        if not callable(meta_loss):
            raise ConfigError(f"meta_train: {type(learner).__name__} has no meta_loss(episodes); it cannot be meta-trained")
        self.learner = learner
        self.meta_loss: Callable[[Sequence[Any]], Tensor] = meta_loss
        self.episodes = episodes
        trained = {id(p) for p in parameters}
        self.untrained = [p for p in learner.parameters() if id(p) not in trained]
        self.val_batches = list(val_batches)
        self.taken = 0
        self.losses: list[float] = []
        self._iterator: Optional[Iterator[Sequence[Any]]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "batches": int(self.taken), "losses": list(self.losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint data state is for {state.get('kind')!r} training, not {self.kind!r}")
        self.taken = int(state["batches"])
        self.losses = [float(v) for v in state["losses"]]
        self._iterator = None

    def start(self) -> None:
        """Position an iterable source after the batches already taken (a no-op for a callable)."""
        if callable(self.episodes):
            return
        self._iterator = iter(self.episodes)
        for done in range(self.taken):
            if next(self._iterator, None) is None:
                raise ConfigError(
                    f"meta_train: the episode iterable has {done} meta-batches, but the checkpoint "
                    f"has already used {self.taken}"
                )

    def close(self) -> None:
        self._iterator = None

    def _next_batch(self) -> Sequence[Any]:
        if callable(self.episodes):
            return self.episodes()
        if self._iterator is None:
            self.start()
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration as err:
            raise ConfigError(f"meta_train: the episode iterable ran out after {self.taken} meta-batches") from err

    def train_step(self, step: int) -> dict[str, float]:
        """Backpropagate one meta-batch's meta-loss; returns its sum and episode count for logging."""
        batch = self._next_batch()
        self.taken += 1
        loss = self.meta_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"meta_train: non-finite meta-loss {float(loss)} at step {step}")
        loss.backward()
        for p in self.untrained:
            p.grad = None
        value = float(loss.detach())
        self.losses.append(value)
        return {"loss_sum": value * len(batch), "count": float(len(batch))}

    def validate(self) -> dict[str, float]:
        """Mean meta-loss over the validation batches (none: no validation)."""
        if not self.val_batches:
            return {}
        with torch.no_grad():
            total = sum(float(self.meta_loss(batch)) for batch in self.val_batches)
        return {"val/loss": total / len(self.val_batches)}


def meta_train(
    learner: nn.Module,
    episodes: EpisodeBatches,
    steps: int,
    lr: float = 1e-3,
    parameters: Optional[Iterable[Tensor]] = None,
    max_grad_norm: Optional[float] = None,
    *,
    run_dir: Optional[Union[str, Path]] = None,
    resume: Optional[bool] = None,
    checkpoint_every: int = 100,
    log_every: int = 1,
    val_batches: Sequence[Sequence[Any]] = (),
    val_every: int = 100,
    patience: Optional[int] = None,
    loggers: Sequence[str] = ("csv",),
    progress: bool = False,
) -> list[float]:
    """Meta-train ``learner`` with Adam on ``learner.meta_loss`` for ``steps`` meta-batches.

    ``episodes`` is a callable returning a batch of episodes, or an iterable of batches.
    ``parameters`` defaults to the learner's trainable parameters outside its backbone (the
    decoder, for :class:`~medmeta.adapters.segmentation.heads.UNetSegmenter`) and must belong
    to the learner (they are checkpointed with it). Training runs through
    :class:`~medmeta.training.loop.TrainingLoop`: with ``run_dir`` it writes
    ``checkpoints/last.pt`` (every ``checkpoint_every`` steps and at the end), ``best.pt`` (by
    ``val/loss`` when ``val_batches`` are given) and ``metrics.csv``; ``resume`` as
    ``trainer.resume`` (``None``: continue from ``checkpoints/last.pt`` when it exists; ``True``:
    it must exist; ``False``: start afresh). Without ``run_dir`` checkpoints go to a temporary
    folder that is removed afterwards. Returns the meta-loss of every step since the run began
    (steps before a resume included).
    """
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, got {steps}")
    if parameters is None:
        parameters = [p for n, p in learner.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    params = list(parameters)
    if not params:
        raise ConfigError("meta_train: no parameters to train (pass parameters=...)")
    names = {id(p): n for n, p in learner.named_parameters()}
    if any(id(p) not in names for p in params):
        raise ConfigError("meta_train: parameters=... must be parameters of the learner (they are checkpointed with it)")
    settings = LoopSettings(
        steps=int(steps),
        val_every=int(val_every),
        checkpoint_every=int(checkpoint_every),
        log_every=int(log_every),
        grad_clip=None if max_grad_norm is None else float(max_grad_norm),
        patience=patience,
        progress=bool(progress),
    )
    objective = SegmentationObjective(learner, episodes, params, val_batches)
    fingerprint = _fingerprint(learner, [names[id(p)] for p in params], lr, settings.grad_clip)
    optimizer = torch.optim.Adam(params, lr=lr)
    fit(learner, objective, optimizer, settings, fingerprint=fingerprint, device=params[0].device,
        run_dir=run_dir, resume=resume, loggers=loggers)
    return list(objective.losses)


def _fingerprint(learner: nn.Module, trained: list[str], lr: float, grad_clip: Optional[float]) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (``fit`` adds the shapes)."""
    return {
        "objective": SegmentationObjective.kind,
        "learner": type(learner).__name__,
        "trained": trained,
        "lr": float(lr),
        "grad_clip": grad_clip,
    }
