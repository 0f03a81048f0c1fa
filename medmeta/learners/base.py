"""The one learner API that every protocol, experiment and adapter uses.

A learner adapts to a labelled support set and returns a predictor that maps query images to
logits (inference), and gives a meta-training loss for a batch of episodes (training).
Learners whose predictions depend on images only through a frozen backbone set
``frozen_backbone = True`` and implement :meth:`Learner.adapt_features`, so protocols can embed
every image once and solve episodes on cached features.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from medmeta.tasks import Episode, TaskDescription

__all__ = ["Learner", "Predictor", "TrainingKind"]

Predictor = Callable[[Tensor], Tensor]

TrainingKind = Literal["episodic", "pretraining"]
"""How a learner trains: ``"episodic"`` (``meta_loss`` on meta-batches of episodes) or
``"pretraining"`` (``loss`` on mixed-task batches of images); ``None`` means it is not trainable."""


class Learner(nn.Module):
    """Base class: ``adapt(support) -> predictor``, ``predictor(query) -> logits``."""

    #: True when predictions depend on images only through ``embed`` (features can be cached).
    frozen_backbone: bool = False
    #: How the training app trains this learner; ``None``: it adapts at test time only.
    training_kind: ClassVar[Optional[TrainingKind]] = None

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Adapt to a support set; return a callable mapping query images to logits."""
        if self.frozen_backbone:
            with torch.no_grad():
                feats = self.embed(support_images)
            features_predictor = self.adapt_features(feats, support_labels, description)

            def predict(query_images: Tensor) -> Tensor:
                with torch.no_grad():
                    return features_predictor(self.embed(query_images))

            return predict
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt()")

    def predict(self, episode: Episode) -> Tensor:
        """Query logits for an episode."""
        return self.adapt(episode.support_images, episode.support_labels, episode.description)(
            episode.query_images
        )

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean query loss over a batch of episodes, differentiable w.r.t. meta-parameters."""
        raise NotImplementedError(f"{type(self).__name__} has no meta-training loss")

    # Feature path for frozen-backbone learners -------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """Backbone features of ``images`` (``(B, D)``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement embed()")

    def adapt_features(
        self, support_features: Tensor, support_labels: Tensor, description: TaskDescription
    ) -> Predictor:
        """Adapt on precomputed support features; the predictor maps query features to logits."""
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt_features()")
