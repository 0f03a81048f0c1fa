"""BD-CSPN: prototype rectification (Liu, Song and Qin, "Prototype Rectification for Few-Shot
Learning", ECCV 2020).

Two biases of support-mean prototypes are reduced with the unlabelled query set:

* cross-class bias: every query is shifted by ``xi = mean(support) - mean(query)``;
* intra-class bias: queries get the pseudo-label of their nearest prototype (cosine), and each
  class's prototype becomes a weighted mean of its support examples and pseudo-labelled
  (shifted) queries, with weights ``softmax_i(epsilon * cos(x_i, p_c))`` over the class's
  members (Eq. 5-6 of the paper).

Queries are classified by ``epsilon * cos(query, rectified prototype)`` (the paper's cosine
classifier; ``epsilon`` also serves as its softmax temperature). By default (``top_z=None``)
every query with a pseudo-label joins its class, as in easyfsl's ``BDCSPN``; with ``epsilon=1``
this learner then equals easyfsl's on the same features. The paper adds only the top-Z most
confident pseudo-labelled queries of each class (Sec. 3.2): ``top_z=Z`` keeps, per class, the
``Z`` queries assigned to it with the highest confidence, the softmax probability
``softmax(epsilon * cos(shifted query, prototypes))`` of the assigned class (ties: the earlier
query); a class with at most ``Z`` assigned queries keeps them all. Binary and multi-label
tasks: per label, negatives against positives (see :mod:`medmeta.learners.transductive`), so
``top_z`` applies to each side of each label.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.checks import feature_dim
from medmeta.learners.transductive import TransductiveFeatureLearner, check_positive, one_hot

__all__ = ["BDCSPN", "rectify_prototypes", "cosine_scores", "top_confident"]


def cosine_scores(features: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarities ``(N, C)`` between rows of ``features`` and ``prototypes``."""
    return F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).transpose(0, 1)


def top_confident(membership: Tensor, confidence: Tensor, top_z: int) -> Tensor:
    """``membership`` ``(N, C)`` (0/1, one 1 per row) with at most ``top_z`` rows kept per
    column: those of the highest ``confidence`` ``(N,)`` (ties: the lower row index)."""
    keep = torch.zeros_like(membership)
    for c in range(membership.shape[1]):
        rows = torch.nonzero(membership[:, c] > 0).flatten()
        if rows.numel() > top_z:
            order = torch.argsort(confidence[rows], descending=True, stable=True)[:top_z]
            rows = rows[order]
        keep[rows, c] = 1
    return keep


def rectify_prototypes(
    support: Tensor, labels: Tensor, query: Tensor, num_classes: int, epsilon: float = 10.0,
    top_z: Optional[int] = None,
) -> Tensor:
    """Rectified prototypes ``(C, D)`` (BD-CSPN, Eq. 5-6 and the query shift of Sec. 3.2).

    ``labels`` are integer classes ``0..C-1`` of the support rows; every class must occur.
    ``top_z``: only the ``top_z`` most confident pseudo-labelled queries per class join it
    (module doc); ``None``: all of them.
    """
    onehot_s = one_hot(labels, num_classes, support.dtype)
    prototypes = (onehot_s.transpose(0, 1) @ support) / onehot_s.sum(dim=0).clamp_min(1.0)[:, None]
    shifted = query + (support.mean(dim=0, keepdim=True) - query.mean(dim=0, keepdim=True))
    weight_s = (epsilon * cosine_scores(support, prototypes)).exp() * onehot_s
    query_cos = cosine_scores(shifted, prototypes)
    onehot_q = one_hot(query_cos.argmax(dim=1), num_classes, support.dtype)
    if top_z is not None:
        confidence = torch.softmax(epsilon * query_cos, dim=1).amax(dim=1)
        onehot_q = top_confident(onehot_q, confidence, top_z)
    weight_q = (epsilon * query_cos).exp() * onehot_q
    total = weight_s.sum(dim=0) + weight_q.sum(dim=0)
    return (weight_s.transpose(0, 1) @ support + weight_q.transpose(0, 1) @ shifted) / total[:, None]


class BDCSPN(TransductiveFeatureLearner):
    """BD-CSPN on a frozen backbone's pooled features (module doc).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        epsilon: the paper's ``epsilon``: scale of the cosine similarities in the rectification
            weights and in the output logits (paper: 10; easyfsl: 1).
        top_z: pseudo-labelled queries per class that join the rectification, the most
            confident ones (the paper's top-Z); ``None`` (default): all of them, as easyfsl.
    """

    def __init__(self, backbone: nn.Module, epsilon: float = 10.0, top_z: Optional[int] = None) -> None:
        super().__init__()
        check_positive("BDCSPN", epsilon=epsilon)
        if top_z is not None and (isinstance(top_z, bool) or not isinstance(top_z, int) or top_z < 1):
            raise ConfigError(f"BDCSPN: top_z must be a positive integer or None, got {top_z!r}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.epsilon = float(epsilon)
        self.top_z = top_z

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        prototypes = rectify_prototypes(support, labels, query, num_classes, self.epsilon, self.top_z)
        return self.epsilon * cosine_scores(query, prototypes)
