"""LaplacianShot (Ziko, Dolz, Granger and Ben Ayed, "Laplacian Regularized Few-Shot Learning",
ICML 2020).

Query assignments ``Y`` minimise ``sum_q y_q . a_q - lam/2 sum_{q,p} w_qp y_q . y_p`` over the
simplex, where ``a_q`` holds the squared distances from query ``q`` to the class prototypes and
``W`` is the query kNN graph (``w_qp = 1`` when ``p`` is among the ``knn - 1`` nearest
neighbours of ``q``, as the authors' ``create_affinity``). The paper's bound optimiser iterates
``y_q = softmax(-a_q + lam * sum_p w_qp y_p)`` for all queries at once until the bound's relative
change is below 1e-6 (at most ``steps`` iterations). The logits are the last iteration's
pre-softmax scores ``-a_q + lam * (W Y)_q``.

Prototypes are the support means, rectified with BD-CSPN's query shift and pseudo-labelled
queries (:func:`medmeta.learners.bd_cspn.rectify_prototypes`, scale ``rectify_epsilon``; ``None``
keeps the support means), as the paper's "prototype rectification". Features are L2-normalised
by default. Defaults are easyfsl's (``knn=3``, ``lam=0.7``, 20 steps, tuned there for 5-way
5-shot mini-ImageNet); with ``rectify_epsilon=1`` this learner equals easyfsl's
``LaplacianShot(feature_normalization=2)`` on the same features. Binary and multi-label tasks:
per label, negatives against positives (see :mod:`medmeta.learners.transductive`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.bd_cspn import rectify_prototypes
from medmeta.learners.checks import feature_dim
from medmeta.learners.transductive import TransductiveFeatureLearner, check_positive, one_hot

__all__ = ["LaplacianShot", "knn_affinity", "bound_energy"]

NORMALIZATIONS = (None, "l2")


def knn_affinity(features: Tensor, knn: int) -> Tensor:
    """``(N, N)`` 0/1 matrix: row ``i`` marks the ``knn - 1`` nearest other rows of row ``i``
    (Euclidean; the nearest row, itself, is dropped). Not symmetric."""
    n = features.shape[0]
    k = min(int(knn), n)
    affinity = features.new_zeros((n, n))
    if k < 2:
        return affinity
    neighbours = torch.cdist(features, features).topk(k, largest=False).indices[:, 1:]
    return affinity.scatter_(1, neighbours, 1.0)


def bound_energy(assignments: Tensor, unary: Tensor, affinity: Tensor, lam: float) -> float:
    """The bound objective of the paper's Eq. 7 (used as the stopping rule)."""
    pairwise = affinity @ assignments
    value = assignments * (assignments + 1e-12).log() + unary * assignments - lam * pairwise * assignments
    return float(value.sum())


class LaplacianShot(TransductiveFeatureLearner):
    """LaplacianShot on a frozen backbone's pooled features (module doc).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        knn: neighbourhood size of the query graph (``knn - 1`` neighbours besides itself).
        lam: weight ``lambda`` of the Laplacian term.
        steps: at most this many bound iterations.
        rectify_epsilon: BD-CSPN rectification of the prototypes with this scale; ``None``: the
            plain support means.
        normalize: ``"l2"`` (unit-length features) or ``None``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        knn: int = 3,
        lam: float = 0.7,
        steps: int = 20,
        rectify_epsilon: Optional[float] = 10.0,
        normalize: Optional[str] = "l2",
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"LaplacianShot: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if int(knn) < 1:
            raise ConfigError(f"LaplacianShot: knn must be >= 1, got {knn}")
        if int(steps) < 1:
            raise ConfigError(f"LaplacianShot: steps must be >= 1, got {steps}")
        if not float(lam) >= 0:
            raise ConfigError(f"LaplacianShot: lam must be >= 0, got {lam!r}")
        if rectify_epsilon is not None:
            check_positive("LaplacianShot", rectify_epsilon=rectify_epsilon)
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.knn = int(knn)
        self.lam = float(lam)
        self.steps = int(steps)
        self.rectify_epsilon = None if rectify_epsilon is None else float(rectify_epsilon)
        self.normalize = normalize

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        if self.normalize == "l2":
            support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
        if self.rectify_epsilon is None:
            onehot = one_hot(labels, num_classes, support.dtype)
            prototypes = (onehot.transpose(0, 1) @ support) / onehot.sum(dim=0)[:, None]
        else:
            prototypes = rectify_prototypes(support, labels, query, num_classes, self.rectify_epsilon)
        unary = torch.cdist(query, prototypes) ** 2
        affinity = knn_affinity(query, self.knn)
        assignments = (-unary).softmax(dim=1)
        scores = -unary
        old = float("inf")
        for i in range(self.steps):
            scores = -unary + self.lam * (affinity @ assignments)
            assignments = scores.softmax(dim=1)
            energy = bound_energy(assignments, unary, affinity, self.lam)
            if i > 1 and abs(energy - old) <= 1e-6 * abs(old):
                break
            old = energy
        return scores
