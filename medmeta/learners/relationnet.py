"""Relation networks (Sung et al., CVPR 2018, "Learning to Compare").

A learned relation module scores every (class prototype, query) pair: the prototype is the mean
support feature of the class, the pair is the concatenation ``[prototype, query]`` and the score
``s`` is the output of a small MLP (Sung et al. apply two conv blocks and two fully-connected
layers to concatenated feature maps; medmeta backbones give pooled feature vectors, so the
module here is ``Linear(2D, hidden) - ReLU - Linear(hidden, 1)``). The relation score of the
paper is ``sigmoid(s)``; the logits are ``s`` (monotone in the relation score).

Loss (``loss``): ``"mse"`` (Sung et al.: mean squared error between the relation scores and the
one-hot targets) or ``"ce"`` (the task loss on the logits).

Binary and multi-label tasks get a positive and a negative prototype per label, as in
ProtoNet: the logit of label ``k`` is ``s(pos_k, q) - s(neg_k, q)``, the log-odds of a softmax
over the two relation logits; with ``loss="mse"`` the targets are ``y`` for the positive and
``1 - y`` for the negative prototype. Ordinal tasks are treated as multi-class.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.heads import task_loss
from medmeta.learners.metric import EpisodeHead, MetricLearner
from medmeta.learners.protonet import class_prototypes
from medmeta.tasks import TaskDescription

__all__ = ["RelationNet", "RELATION_LOSSES"]

RELATION_LOSSES = ("mse", "ce")


class RelationNet(MetricLearner):
    """Relation network with an MLP relation module on pooled features.

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        hidden: width of the relation module's hidden layer.
        loss: ``"mse"`` (Sung et al.) or ``"ce"`` (task loss on the relation logits).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks when ``loss="ce"``.
    """

    def __init__(self, backbone: nn.Module, hidden: int = 64, loss: str = "mse", ordinal_loss: str = "ce") -> None:
        super().__init__(backbone, ordinal_loss)
        if loss not in RELATION_LOSSES:
            raise ValueError(f"RelationNet: loss must be one of {RELATION_LOSSES}, got {loss!r}")
        if hidden < 1:
            raise ValueError(f"RelationNet: hidden must be >= 1, got {hidden}")
        self.loss = loss
        self.hidden = int(hidden)
        d = self.num_features
        self.relation = nn.Sequential(nn.Linear(2 * d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        ref = next(iter(backbone.parameters()), None)
        if ref is not None:
            self.relation.to(device=ref.device, dtype=ref.dtype)

    def relation_logits(self, prototypes: Tensor, query_features: Tensor) -> Tensor:
        """Relation logits ``(Q, C)`` of every query with every prototype (``[prototype, query]`` pairs)."""
        q, c = query_features.shape[0], prototypes.shape[0]
        pairs = torch.cat(
            [prototypes.unsqueeze(0).expand(q, -1, -1), query_features.unsqueeze(1).expand(-1, c, -1)], dim=2
        )
        return self.relation(pairs).squeeze(-1)

    def _scores(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription):
        protos = class_prototypes(support_features, support_labels, description)

        def scores(query_features: Tensor) -> tuple[Tensor, Optional[Tensor]]:
            pos = self.relation_logits(protos.positive, query_features)
            neg = None if protos.negative is None else self.relation_logits(protos.negative, query_features)
            return pos, neg

        return scores

    def episode_head(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> EpisodeHead:
        scores = self._scores(support_features, support_labels, description)

        def head(query_features: Tensor) -> Tensor:
            pos, neg = scores(query_features)
            return pos if neg is None else pos - neg

        return head

    def episode_loss(
        self, support_features: Tensor, support_labels: Tensor, query_features: Tensor, query_labels: Tensor,
        description: TaskDescription,
    ) -> Tensor:
        pos, neg = self._scores(support_features, support_labels, description)(query_features)
        if self.loss == "ce":
            logits = pos if neg is None else pos - neg
            return task_loss(logits, query_labels, description.task_target, ordinal_loss=self.ordinal_loss)
        if neg is None:
            target = F.one_hot(query_labels.long(), pos.shape[1]).to(pos.dtype)
            return F.mse_loss(torch.sigmoid(pos), target)
        y = query_labels.to(pos.dtype).reshape(pos.shape)
        return F.mse_loss(torch.sigmoid(torch.cat([pos, neg], dim=1)), torch.cat([y, 1.0 - y], dim=1))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, loss={self.loss!r}"
