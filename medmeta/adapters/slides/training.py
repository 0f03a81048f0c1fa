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

The trainers run it with :func:`medmeta.training.fit.fit`: with a ``run_dir`` the run writes
``checkpoints/last.pt`` (atomically, every ``checkpoint_every`` steps and at the end),
``checkpoints/best.pt`` and ``metrics.csv``, and a later call with the same folder resumes from
``last.pt``; without one it trains in a temporary folder that is deleted afterwards.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from medmeta.training.loop import episode_seed

__all__ = ["BatchObjective", "LossFn"]

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
