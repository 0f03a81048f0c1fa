"""FEAT (Ye et al., CVPR 2020, "Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions").

The class prototypes of an episode (mean support features) are adapted jointly by a set-to-set
function, a transformer layer over the set of prototypes (:class:`SetAttention`: scaled
dot-product self-attention, an output projection, dropout, a residual connection and layer
normalisation, as in the authors' code and easyfsl), so each prototype is adjusted in the
context of the others; queries are classified by their distance to the adapted prototypes as in
ProtoNet: ``-d(q, p) / temperature`` with ``d`` the squared Euclidean distance (the authors'
``use_euclidean``; temperature 64 as in their scripts) or the cosine distance.

Binary and multi-label tasks get a positive and a negative prototype per label (as ProtoNet);
all ``2K`` of them form the set the transformer adapts, and the logit of label ``k`` is
``(-d(q, pos_k) + d(q, neg_k)) / temperature``. Ordinal tasks are treated as multi-class.

Training adds FEAT's contrastive regulariser (Sec. 3.3 of the paper; ``balance`` and
``temperature2`` in the authors' code): the support and query examples of each class form one
set, the set-to-set transformer adapts it (attention within the class's set only), the mean of
the adapted set is the class's centre, and every support and query example (its backbone
feature, not adapted) is classified against those centres by the same distance with
``temperature2``. The episode loss is ``query task loss + balance * regulariser task loss``
(:meth:`FEAT.regularizer_loss`). Binary and multi-label tasks: each label's positives and its
negatives are two sets, and an example's logit for the label is
``(-d(x, centre+) + d(x, centre-)) / temperature2`` with the binary cross-entropy; ordinal tasks
as multi-class (or ``ordinal_loss: soft``). Defaults ``balance=0.1``, ``temperature2=32`` are the
authors' ResNet-12 scripts (with ``temperature=64``); ``balance=0`` gives the query loss alone.
The regulariser needs labelled queries, so it only enters :meth:`episode_loss` (training);
test-time adaptation and predictions do not depend on it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medmeta.learners.heads import task_loss
from medmeta.learners.metric import EpisodeHead, MetricLearner
from medmeta.learners.protonet import DISTANCES, Prototypes, class_prototypes, prototype_logits, prototype_membership
from medmeta.tasks import TaskDescription

__all__ = ["FEAT", "SetAttention"]


class SetAttention(nn.Module):
    """A transformer layer over a set ``(n, D)`` -> ``(n, D)``, permutation-equivariant.

    ``LayerNorm(x + Dropout(fc(Attention(x W_q, x W_k, x W_v))))`` with ``heads`` heads of size
    ``D`` each and attention ``softmax(q k^T / sqrt(D))`` (with dropout). Parameter names and
    initialisation follow FEAT's ``MultiHeadAttention`` (``w_qs``, ``w_ks``, ``w_vs``, ``fc``,
    ``layer_norm``), so the authors' (and easyfsl's) weights load with ``load_state_dict``.
    """

    def __init__(self, dim: int, heads: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"SetAttention: heads must be >= 1, got {heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SetAttention: dropout must be in [0, 1), got {dropout}")
        self.dim = int(dim)
        self.heads = int(heads)
        self.w_qs = nn.Linear(dim, heads * dim, bias=False)
        self.w_ks = nn.Linear(dim, heads * dim, bias=False)
        self.w_vs = nn.Linear(dim, heads * dim, bias=False)
        std = math.sqrt(2.0 / (dim + dim))
        for lin in (self.w_qs, self.w_ks, self.w_vs):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        self.fc = nn.Linear(heads * dim, dim)
        nn.init.xavier_normal_(self.fc.weight)
        self.layer_norm = nn.LayerNorm(dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, d, h = x.shape[0], self.dim, self.heads
        q = self.w_qs(x).view(n, h, d).transpose(0, 1)  # (h, n, d)
        k = self.w_ks(x).view(n, h, d).transpose(0, 1)
        v = self.w_vs(x).view(n, h, d).transpose(0, 1)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=2)
        out = (self.attention_dropout(attention) @ v).transpose(0, 1).reshape(n, h * d)
        return self.layer_norm(self.dropout(self.fc(out)) + x)


class FEAT(MetricLearner):
    """ProtoNet with prototypes adapted by a set-to-set transformer (FEAT).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        heads: attention heads of the set-to-set transformer (FEAT: 1).
        dropout: dropout of the transformer (FEAT: 0.5), active in training only.
        distance: ``"euclidean"`` (squared) or ``"cosine"`` (``1 - cos``).
        temperature: logits are ``-distance / temperature`` (FEAT's scripts: 64).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.
        balance: weight of the contrastive regulariser in the training loss (module doc; the
            authors' ResNet-12 scripts: 0.1; 0 switches it off). Not used at test time.
        temperature2: temperature of the regulariser's logits (the authors' scripts: 32).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: int = 1,
        dropout: float = 0.5,
        distance: str = "euclidean",
        temperature: float = 64.0,
        ordinal_loss: str = "ce",
        balance: float = 0.1,
        temperature2: float = 32.0,
    ) -> None:
        super().__init__(backbone, ordinal_loss)
        if distance not in DISTANCES:
            raise ValueError(f"FEAT: distance must be one of {DISTANCES}, got {distance!r}")
        if not temperature > 0:
            raise ValueError(f"FEAT: temperature must be positive, got {temperature}")
        if not (math.isfinite(balance) and balance >= 0):
            raise ValueError(f"FEAT: balance must be a finite number >= 0, got {balance}")
        if not temperature2 > 0:
            raise ValueError(f"FEAT: temperature2 must be positive, got {temperature2}")
        self.distance = distance
        self.temperature = float(temperature)
        self.balance = float(balance)
        self.temperature2 = float(temperature2)
        self.attention = SetAttention(self.num_features, heads=heads, dropout=dropout)
        ref = next(iter(backbone.parameters()), None)
        if ref is not None:
            self.attention.to(device=ref.device, dtype=ref.dtype)

    def adapted_prototypes(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Prototypes:
        """Class prototypes (positive and negative ones for sigmoid tasks) adapted as one set."""
        protos = class_prototypes(support_features, support_labels, description)
        if protos.negative is None:
            return Prototypes(self.attention(protos.positive))
        k = protos.positive.shape[0]
        adapted = self.attention(torch.cat([protos.positive, protos.negative]))
        return Prototypes(adapted[:k], adapted[k:])

    def episode_head(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> EpisodeHead:
        protos = self.adapted_prototypes(support_features, support_labels, description)

        def head(query_features: Tensor) -> Tensor:
            return prototype_logits(query_features, protos, self.distance, self.temperature)

        return head

    def _set_centres(self, features: Tensor, membership: Tensor) -> Tensor:
        """``(C, D)``: per column of the 0/1 ``membership`` ``(N, C)``, the mean of that set
        adapted by the transformer (a set without members gets a zero centre, as in
        :func:`~medmeta.learners.protonet.class_prototypes`)."""
        centres = []
        for c in range(membership.shape[1]):
            members = features[membership[:, c] > 0]
            if members.shape[0] == 0:
                centres.append(features.new_zeros(features.shape[1]))
            else:
                centres.append(self.attention(members).mean(dim=0))
        return torch.stack(centres)

    def regularizer_logits(self, features: Tensor, labels: Tensor, description: TaskDescription) -> Tensor:
        """The contrastive regulariser's logits ``(N, num_outputs)`` of labelled examples
        (support and query together): each example against the centres of the adapted class sets."""
        pos, neg = prototype_membership(labels, description, features.dtype)
        centres = Prototypes(self._set_centres(features, pos), None if neg is None else self._set_centres(features, neg))
        return prototype_logits(features, centres, self.distance, self.temperature2)

    def regularizer_loss(
        self, support_features: Tensor, support_labels: Tensor, query_features: Tensor, query_labels: Tensor,
        description: TaskDescription,
    ) -> Tensor:
        """FEAT's contrastive regulariser (unweighted): the task loss of :meth:`regularizer_logits`
        over the episode's support and query examples."""
        features = torch.cat([support_features, query_features])
        labels = torch.cat([support_labels, query_labels])
        logits = self.regularizer_logits(features, labels, description)
        return task_loss(logits, labels, description.task_target, ordinal_loss=self.ordinal_loss)

    def episode_loss(
        self, support_features: Tensor, support_labels: Tensor, query_features: Tensor, query_labels: Tensor,
        description: TaskDescription,
    ) -> Tensor:
        """The query task loss plus ``balance`` times the contrastive regulariser."""
        loss = super().episode_loss(support_features, support_labels, query_features, query_labels, description)
        if self.balance == 0:
            return loss
        reg = self.regularizer_loss(support_features, support_labels, query_features, query_labels, description)
        return loss + self.balance * reg

    def extra_repr(self) -> str:
        return (
            f"distance={self.distance!r}, temperature={self.temperature}, balance={self.balance}, "
            f"temperature2={self.temperature2}"
        )
