"""Shared plumbing of frozen-backbone learners (ProtoNet at test time, linear probes).

Their predictions depend on images only through backbone features, computed in eval mode
(BatchNorm running statistics, no dropout) and without gradients, so protocols may embed every
image once and call :meth:`~medmeta.learners.base.Learner.adapt_features` on cached features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from medmeta.learners.base import Learner, Predictor
from medmeta.learners.checks import check_query, check_support
from medmeta.modes import module_mode
from medmeta.tasks import TaskDescription

__all__ = ["FrozenFeatureLearner"]


class FrozenFeatureLearner(Learner):
    """A learner that adapts on pooled backbone features; subclasses implement ``adapt_features``."""

    frozen_backbone = True
    backbone: nn.Module

    def embed(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, D)`` in eval mode; the backbone's mode is restored afterwards."""
        with module_mode(self.backbone, False):
            return self.backbone(images)

    def embed_no_grad(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.embed(images)

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support(support_images, support_labels, description)
        features_predictor = self.adapt_features(self.embed_no_grad(support_images), support_labels, description)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            return features_predictor(self.embed_no_grad(query_images))

        return predict
