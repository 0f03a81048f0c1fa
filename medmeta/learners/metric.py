"""Shared plumbing of metric learners: an episodic head on backbone features (MatchingNet,
RelationNet, FEAT, R2D2).

Each method only says how a support set of features becomes a function from query features to
logits (:meth:`MetricLearner.episode_head`, differentiable) and, if it trains with something
other than the task loss on those logits, its episode loss (:meth:`MetricLearner.episode_loss`).
This class supplies the rest, the same way for every method:

* test time: the backbone is frozen (``frozen_backbone = True``): features are computed in eval
  mode and protocols may cache them; :meth:`adapt_features` builds the head without gradients,
  with the learner's own modules (attention, LSTMs, relation module) in eval mode (no dropout);
* training (``training_kind = "episodic"``): support and query images go through the backbone
  in its current mode, the head is built on the support features and the query loss is
  backpropagated episode by episode (one graph alive at a time), each inside the training
  loop's per-episode scope.

Labels follow the episode encoding of :mod:`medmeta.tasks`; binary and multi-label tasks are
handled as ProtoNet does (a positive and a negative side per label, logit = log-odds).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from medmeta.learners.base import EpisodeScope, Predictor
from medmeta.learners.checks import check_episodes, check_query_features, check_support_features, feature_dim
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.heads import task_loss
from medmeta.modes import module_mode
from medmeta.tasks import Episode, TaskDescription

__all__ = ["MetricLearner", "EpisodeHead", "ORDINAL_LOSSES"]

EpisodeHead = Callable[[Tensor], Tensor]
"""Query features ``(Q, D)`` -> logits ``(Q, num_outputs)`` for one support set."""

ORDINAL_LOSSES = ("ce", "soft")


class MetricLearner(FrozenFeatureLearner):
    """Base class of learners whose per-episode model is a function of the support features.

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks in the task loss.
    """

    training_kind = "episodic"

    def __init__(self, backbone: nn.Module, ordinal_loss: str = "ce") -> None:
        super().__init__()
        if ordinal_loss not in ORDINAL_LOSSES:
            raise ValueError(f"{type(self).__name__}: ordinal_loss must be one of {ORDINAL_LOSSES}, got {ordinal_loss!r}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.ordinal_loss = ordinal_loss

    # -- what a method defines ------------------------------------------------------------
    def episode_head(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> EpisodeHead:
        """The episode's classifier on query features, differentiable w.r.t. features and parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not implement episode_head()")

    def episode_loss(
        self, support_features: Tensor, support_labels: Tensor, query_features: Tensor, query_labels: Tensor,
        description: TaskDescription,
    ) -> Tensor:
        """The training loss of one episode: by default the task loss of the query logits."""
        logits = self.episode_head(support_features, support_labels, description)(query_features)
        return task_loss(logits, query_labels, description.task_target, ordinal_loss=self.ordinal_loss)

    # -- inference ------------------------------------------------------------------------
    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        support_features = support_features.detach()
        with torch.no_grad(), module_mode(self, False):
            head = self.episode_head(support_features, support_labels, description)

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            with torch.no_grad(), module_mode(self, False):
                return head(query_features)

        return predict

    # -- training -------------------------------------------------------------------------
    def _features(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Support and query features (backbone in its current mode; one pass when shapes agree)."""
        n = episode.support_images.shape[0]
        if episode.support_images.shape[1:] == episode.query_images.shape[1:]:
            feats = self.backbone(torch.cat([episode.support_images, episode.query_images]))
            return feats[:n], feats[n:]
        return self.backbone(episode.support_images), self.backbone(episode.query_images)

    def query_logits(self, episodes: Sequence[Episode]) -> list[Tensor]:
        """Differentiable query logits of every episode (modules in their current mode)."""
        check_episodes(episodes)
        out = []
        for ep in episodes:
            support_f, query_f = self._features(ep)
            out.append(self.episode_head(support_f, ep.support_labels, ep.description)(query_f))
        return out

    def episode_losses(self, episodes: Sequence[Episode]) -> Tensor:
        """Training loss of every episode, ``(E,)``, differentiable."""
        check_episodes(episodes)
        losses = []
        for ep in episodes:
            support_f, query_f = self._features(ep)
            losses.append(self.episode_loss(support_f, ep.support_labels, query_f, ep.query_labels, ep.description))
        return torch.stack(losses)

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean training loss over the meta-batch."""
        return self.episode_losses(episodes).mean()

    def meta_backward(
        self, episodes: Sequence[Episode], scale: Optional[float] = None, episode_scope: Optional[EpisodeScope] = None
    ) -> Tensor:
        """The gradient of :meth:`meta_loss`, accumulated episode by episode (one graph alive at a
        time), each inside ``episode_scope(episode)``; see :meth:`Learner.meta_backward`."""
        check_episodes(episodes)
        scale = 1.0 / len(episodes) if scale is None else float(scale)
        total: Optional[Tensor] = None
        for ep in episodes:
            with episode_scope(ep) if episode_scope is not None else nullcontext():
                support_f, query_f = self._features(ep)
                loss = self.episode_loss(support_f, ep.support_labels, query_f, ep.query_labels, ep.description)
                (loss * scale).backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total / len(episodes)
