"""Feature caching for frozen-backbone learners: embed every image of a protocol run once.

A learner with ``frozen_backbone = True`` predicts through ``embed`` only (ProtoNet at test time,
SimpleShot, linear probes), so its episodes can be solved on features: the images that any
episode of a task uses are embedded once, in sorted batches, and every episode then calls
``learner.adapt_features`` on rows of that cache. The results equal the plain path
(``learner.adapt`` on images) up to floating-point batching effects; the gain is that an image
used by many episodes (100 instances x 8 shot counts in the L2L protocol) is read and embedded
once instead of once per episode.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from medmeta.data.source import Positions, TaskSource
from medmeta.episodes.labels import labels_to_tensor
from medmeta.episodes.spec import EpisodeSpec
from medmeta.learners.base import Learner

__all__ = ["FeatureCache", "supports_feature_cache"]


def supports_feature_cache(learner: Learner) -> bool:
    """True when the learner declares a frozen backbone (its predictions depend on ``embed``)."""
    return bool(getattr(learner, "frozen_backbone", False))


class FeatureCache:
    """``learner.embed`` features of the items at ``positions`` of ``source``.

    Args:
        learner: a frozen-backbone learner (``embed`` and ``adapt_features``).
        source: the task source the positions refer to.
        positions: item positions to embed (duplicates are embedded once).
        batch_size: images per ``read_images`` + ``embed`` call.
        device: where to embed and keep the features (default: the learner's device).
    """

    def __init__(
        self,
        learner: Learner,
        source: TaskSource,
        positions: Positions,
        batch_size: int = 256,
        device: Optional[Any] = None,
    ) -> None:
        if not supports_feature_cache(learner):
            raise ValueError(
                f"FeatureCache: {type(learner).__name__} does not declare frozen_backbone=True; its "
                f"predictions may change the backbone, so cached features would give other results"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.learner = learner
        self.source = source
        self.device = torch.device(device) if device is not None else _module_device(learner)
        unique = np.unique(np.asarray(positions, dtype=np.int64))
        if len(unique) and (unique[0] < 0 or unique[-1] >= len(source)):
            raise ValueError(f"FeatureCache: positions outside 0..{len(source) - 1}")
        self.positions = unique
        self._row = np.full(len(source), -1, dtype=np.int64)
        self._row[unique] = np.arange(len(unique))
        chunks = []
        with torch.no_grad():
            for i in range(0, len(unique), int(batch_size)):
                images = source.read_images(unique[i : i + int(batch_size)]).to(self.device)
                chunks.append(learner.embed(images))
        self.features: Tensor = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=self.device)

    @classmethod
    def for_specs(
        cls,
        learner: Learner,
        source: TaskSource,
        specs: Sequence[EpisodeSpec],
        batch_size: int = 256,
        device: Optional[Any] = None,
    ) -> "FeatureCache":
        """A cache of every image the episodes use."""
        positions = np.concatenate([s.positions for s in specs]) if specs else np.zeros(0, dtype=np.int64)
        return cls(learner, source, positions, batch_size=batch_size, device=device)

    def __len__(self) -> int:
        return int(len(self.positions))

    def get(self, positions: Positions) -> Tensor:
        """Cached features of item ``positions`` (in the order given)."""
        pos = np.asarray(positions, dtype=np.int64)
        rows = self._row[pos]
        if np.any(rows < 0):
            missing = pos[rows < 0][:10].tolist()
            raise KeyError(f"FeatureCache: positions {missing} were not embedded")
        return self.features[torch.as_tensor(rows, device=self.features.device)]

    def solve(self, spec: EpisodeSpec) -> Tensor:
        """Query logits of an episode, adapting on cached support features."""
        support = self.get(spec.support_positions)
        labels = labels_to_tensor(spec.support_labels, spec.target).to(support.device)
        predictor = self.learner.adapt_features(support, labels, spec.description)
        with torch.no_grad():
            return predictor(self.get(spec.query_positions))


def _module_device(module: torch.nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")
