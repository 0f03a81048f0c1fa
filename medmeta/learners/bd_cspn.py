"""BD-CSPN: prototype rectification (Liu, Song and Qin, "Prototype Rectification for Few-Shot
Learning", ECCV 2020).

Two biases of support-mean prototypes are reduced with the unlabelled query set:

* cross-class bias: every query is shifted by ``xi = mean(support) - mean(query)``;
* intra-class bias: queries get the pseudo-label of their nearest prototype (cosine), and each
  class's prototype becomes a weighted mean of its support examples and pseudo-labelled
  (shifted) queries, with weights ``softmax_i(epsilon * cos(x_i, p_c))`` over the class's
  members (Eq. 5-6 of the paper).

Queries are classified by ``epsilon * cos(query, rectified prototype)`` (the paper's cosine
classifier; ``epsilon`` also serves as its softmax temperature). Every query with a pseudo-label
joins its class, as in easyfsl's ``BDCSPN`` (the paper keeps the top-Z most confident per
class); with ``epsilon=1`` this learner equals easyfsl's on the same features. Binary and
multi-label tasks: per label, negatives against positives (see :mod:`medmeta.learners.transductive`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.checks import feature_dim
from medmeta.learners.transductive import TransductiveFeatureLearner, check_positive, one_hot

__all__ = ["BDCSPN", "rectify_prototypes", "cosine_scores"]


def cosine_scores(features: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarities ``(N, C)`` between rows of ``features`` and ``prototypes``."""
    return F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).transpose(0, 1)


def rectify_prototypes(
    support: Tensor, labels: Tensor, query: Tensor, num_classes: int, epsilon: float = 10.0
) -> Tensor:
    """Rectified prototypes ``(C, D)`` (BD-CSPN, Eq. 5-6 and the query shift of Sec. 3.2).

    ``labels`` are integer classes ``0..C-1`` of the support rows; every class must occur.
    """
    onehot_s = one_hot(labels, num_classes, support.dtype)
    prototypes = (onehot_s.transpose(0, 1) @ support) / onehot_s.sum(dim=0).clamp_min(1.0)[:, None]
    shifted = query + (support.mean(dim=0, keepdim=True) - query.mean(dim=0, keepdim=True))
    weight_s = (epsilon * cosine_scores(support, prototypes)).exp() * onehot_s
    query_cos = cosine_scores(shifted, prototypes)
    onehot_q = one_hot(query_cos.argmax(dim=1), num_classes, support.dtype)
    weight_q = (epsilon * query_cos).exp() * onehot_q
    total = weight_s.sum(dim=0) + weight_q.sum(dim=0)
    return (weight_s.transpose(0, 1) @ support + weight_q.transpose(0, 1) @ shifted) / total[:, None]


class BDCSPN(TransductiveFeatureLearner):
    """BD-CSPN on a frozen backbone's pooled features (module doc).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        epsilon: the paper's ``epsilon``: scale of the cosine similarities in the rectification
            weights and in the output logits (paper: 10; easyfsl: 1).
    """

    def __init__(self, backbone: nn.Module, epsilon: float = 10.0) -> None:
        super().__init__()
        check_positive("BDCSPN", epsilon=epsilon)
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.epsilon = float(epsilon)

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        prototypes = rectify_prototypes(support, labels, query, num_classes, self.epsilon)
        return self.epsilon * cosine_scores(query, prototypes)
