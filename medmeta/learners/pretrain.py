"""Multi-domain multi-task supervised pre-training, mm-PT (Woerner et al. 2024, MedIMeta).

One backbone is shared by all training tasks, each of which has its own linear head (one
output for binary tasks, one per class otherwise); a training batch mixes examples of several
tasks, and the loss is the mean over examples of each example's task loss. After
pre-training the heads are discarded and the backbone is evaluated on unseen tasks by
fine-tuning a new head (MedIMeta's test protocol, :meth:`MultiTaskPretrainer.as_learner`).

A batch is a list of :class:`TaskBatch` (task index, images, labels of the *whole* task in the
episode encoding of :mod:`medmeta.tasks`, item positions). :class:`MixedBatchSampler` builds
such batches from :class:`~medmeta.data.source.TaskSource` objects, either by shuffling the
union of all tasks' items (``"proportional"``: a task appears in proportion to its size, as
with a concatenated dataset) or by drawing the task of each example uniformly (``"uniform"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from medmeta.learners.base import Learner, Predictor
from medmeta.learners.checks import check_images, feature_dim
from medmeta.learners.heads import check_labels, make_head, task_loss
from medmeta.tasks import TaskDescription

__all__ = ["TaskBatch", "MixedBatchSampler", "MultiTaskPretrainer", "SAMPLINGS"]

SAMPLINGS = ("proportional", "uniform")
PRETRAIN_HEADS = ("linear", "cosine")


@dataclass
class TaskBatch:
    """The part of a mixed batch that belongs to one task.

    ``labels`` follow the episode encoding over *all* classes of the task (int64 ``(N,)`` or
    float ``(N, K)``); ``positions`` are the items' positions in the task source (for replay).
    """

    task_index: int
    images: Tensor
    labels: Tensor
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to(self, device: Any, non_blocking: bool = False) -> "TaskBatch":
        return TaskBatch(
            self.task_index,
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.positions,
        )


class MixedBatchSampler:
    """Mixed-task batches (lists of :class:`TaskBatch`) from a list of task sources.

    Iterating yields one epoch: ``ceil(total / batch_size)`` batches (or the floor with
    ``drop_last``), where ``total`` is the number of items of all sources. Each epoch reshuffles
    with a generator seeded by ``(seed, epoch)``, so runs are reproducible and epochs differ.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        batch_size: int = 64,
        seed: int = 0,
        sampling: str = "proportional",
        drop_last: bool = False,
    ) -> None:
        if not sources:
            raise ValueError("MixedBatchSampler: no task sources given")
        if sampling not in SAMPLINGS:
            raise ValueError(f"MixedBatchSampler: sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if batch_size < 1:
            raise ValueError(f"MixedBatchSampler: batch_size must be >= 1, got {batch_size}")
        for i, src in enumerate(sources):
            if len(src) == 0:
                raise ValueError(f"MixedBatchSampler: source {i} ({src.description.task_identifier}) is empty")
        self.sources = list(sources)
        self.descriptions = [s.description for s in self.sources]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sampling = sampling
        self.drop_last = drop_last
        self.epoch = 0
        self._encoded = [self._encode_all(s) for s in self.sources]

    @staticmethod
    def _encode_all(source: Any) -> Tensor:
        from medmeta.episodes.labels import encode_labels, labels_to_tensor

        d = source.description
        return labels_to_tensor(encode_labels(np.asarray(source.labels), d, d), d.task_target)

    def __len__(self) -> int:
        total = sum(len(s) for s in self.sources)
        return total // self.batch_size if self.drop_last else -(-total // self.batch_size)

    def _index_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        sizes = np.array([len(s) for s in self.sources])
        total = int(sizes.sum())
        if self.sampling == "proportional":
            pairs = np.concatenate([np.stack([np.full(n, t), np.arange(n)], axis=1) for t, n in enumerate(sizes)])
            pairs = pairs[rng.permutation(total)]
        else:
            tasks = rng.integers(0, len(sizes), size=total)
            pairs = np.stack([tasks, (rng.random(total) * sizes[tasks]).astype(np.int64)], axis=1)
        n_batches = len(self)
        return [pairs[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_batches)]

    def batch(self, pairs: np.ndarray) -> list[TaskBatch]:
        """Read the images of ``(task index, position)`` pairs into one TaskBatch per task."""
        out = []
        for t in np.unique(pairs[:, 0]):
            positions = np.sort(pairs[pairs[:, 0] == t, 1]).astype(np.int64)
            images = self.sources[int(t)].read_images(positions)
            out.append(TaskBatch(int(t), images, self._encoded[int(t)][torch.as_tensor(positions)], positions))
        return out

    def __iter__(self) -> Iterator[list[TaskBatch]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for pairs in self._index_batches(rng):
            yield self.batch(pairs)


class MultiTaskPretrainer(Learner):
    """A shared backbone with one head per training task (mm-PT).

    Args:
        backbone: feature extractor with ``num_features``.
        tasks: the training tasks' descriptions; head ``i`` belongs to ``tasks[i]``.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.
        eval_learner: learner used by :meth:`adapt` on new tasks (default ``"finetune"``,
            MedIMeta's test protocol), created on the pretrained backbone.
        eval_kwargs: keyword arguments of that learner.
        head: ``"linear"`` (mm-PT) or ``"cosine"`` (Baseline++'s cosine classifier per task,
            :class:`~medmeta.learners.baseline_pp.CosineHead`; test with ``eval_learner="baseline_pp"``).
    """

    training_kind = "pretraining"

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Sequence[TaskDescription],
        ordinal_loss: str = "ce",
        eval_learner: str = "finetune",
        eval_kwargs: Optional[dict[str, Any]] = None,
        head: str = "linear",
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskPretrainer: give at least one training task")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.tasks = list(tasks)
        if head not in PRETRAIN_HEADS:
            raise ValueError(f"MultiTaskPretrainer: head must be one of {PRETRAIN_HEADS}, got {head!r}")
        self.head = head
        if head == "cosine":
            from medmeta.learners.baseline_pp import CosineHead

            self.heads = nn.ModuleList(CosineHead(self.num_features, d) for d in self.tasks)
        else:
            self.heads = nn.ModuleList(make_head(self.num_features, d) for d in self.tasks)
        ref = next(iter(backbone.parameters()), None)
        if ref is not None:
            self.heads.to(device=ref.device, dtype=ref.dtype)
        self.ordinal_loss = ordinal_loss
        self.eval_learner = eval_learner
        self.eval_kwargs = dict(eval_kwargs or {})

    def _check(self, batch: Sequence[TaskBatch]) -> None:
        if not batch:
            raise ValueError("MultiTaskPretrainer: the batch is empty")
        for part in batch:
            if not 0 <= part.task_index < len(self.tasks):
                raise ValueError(f"MultiTaskPretrainer: task index {part.task_index} outside 0..{len(self.tasks) - 1}")
            d = self.tasks[part.task_index]
            check_images(part.images, f"batch part of task {part.task_index} ({d.task_identifier})")
            check_labels(part.labels, d, where=f"batch labels of task {part.task_index} ({d.task_identifier})")
            if len(part.labels) != len(part.images):
                raise ValueError(
                    f"batch part of task {part.task_index}: {len(part.images)} images but {len(part.labels)} labels"
                )

    def logits(self, batch: Sequence[TaskBatch]) -> list[Tensor]:
        """Each part's logits from its task's head; one backbone pass per image shape."""
        self._check(batch)
        in_chans = getattr(self.backbone, "in_chans", None)
        images = [
            p.images.expand(-1, 3, -1, -1) if in_chans == 3 and p.images.shape[1] == 1 else p.images for p in batch
        ]
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(images):
            by_shape.setdefault(tuple(x.shape[1:]), []).append(i)
        feats: list[Optional[Tensor]] = [None] * len(batch)
        for members in by_shape.values():
            out = self.backbone(torch.cat([images[i] for i in members]))
            for i, f in zip(members, out.split([len(images[i]) for i in members])):
                feats[i] = f
        return [self.heads[p.task_index](f) for p, f in zip(batch, feats)]

    def loss(self, batch: Sequence[TaskBatch]) -> Tensor:
        """Mean over the batch's examples of their task losses."""
        logits = self.logits(batch)
        total = sum(len(p.images) for p in batch)
        losses = [
            task_loss(lg, p.labels, self.tasks[p.task_index].task_target, ordinal_loss=self.ordinal_loss) * len(p.images)
            for lg, p in zip(logits, batch)
        ]
        return torch.stack(losses).sum() / total

    def as_learner(self, name: Optional[str] = None, **kwargs: Any) -> Learner:
        """A test-time learner (``"finetune"``, ``"linear_probe"``, ``"protonet"`` ...) on the backbone.

        The learner shares the backbone module (fine-tuning works on copies, so the pretrained
        weights stay unchanged).
        """
        from medmeta.learners.registry import create_learner

        if name is None:
            name, kwargs = self.eval_learner, {**self.eval_kwargs, **kwargs}
        return create_learner(name, self.backbone, **kwargs)

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Adapt with the configured test-time learner (default: MedIMeta fine-tuning)."""
        return self.as_learner().adapt(support_images, support_labels, description)
