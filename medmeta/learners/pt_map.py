"""PT-MAP (Hu, Gripon and Pateux, "Leveraging the Feature Distribution in Transfer-based
Few-Shot Learning", ICANN 2021).

1. Power transform (PT): ``(relu(v) + 1e-6) ** power`` makes ReLU features closer to Gaussian
   (paper: ``power = 0.5``); then, by ``normalize``, ``"l2"`` scales every feature to unit length
   (the paper's Eq. 1) and ``"l2_center"`` additionally centres the support set and the query set
   on their own means and re-normalises (the authors' code, ``centerDatas``).
2. MAP: query soft assignments are the Sinkhorn optimal-transport plan from queries to class
   centres for the cost ``|f - mu_c|^2`` with entropic regularisation ``1 / lam``, rows summing
   to 1 and every class receiving ``n_query / C`` queries (PT-MAP assumes balanced query
   classes); centres move towards the mean of the support features and the soft-assigned query
   features with rate ``lr``, ``steps`` times; the final plan is the prediction.

The logits are ``log`` of the row-normalised final plan (computed in the log domain, so a far
class gets a finite logit). Defaults are the authors' (20 steps, ``lr = 0.2``, ``lam = 10``);
with easyfsl's settings (``normalize=None``, ``steps=10``) this learner equals easyfsl's
``PTMAP`` on the same features with a balanced query set (easyfsl floors ``n_query / C``).
Binary and multi-label tasks: per label, negatives against positives (see
:mod:`medmeta.learners.transductive`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.checks import feature_dim
from medmeta.learners.transductive import TransductiveFeatureLearner, check_positive, one_hot

__all__ = ["PTMAP", "power_transform", "sinkhorn_log"]

NORMALIZATIONS = (None, "l2", "l2_center")


def power_transform(features: Tensor, power: float) -> Tensor:
    """PT-MAP's power transform ``(relu(features) + 1e-6) ** power`` (elementwise)."""
    return (features.relu() + 1e-6).pow(power)


def sinkhorn_log(
    cost: Tensor, lam: float, column_mass: float, tol: float = 1e-6, max_iter: int = 1000
) -> Tensor:
    """Log of the Sinkhorn plan ``(N, C)`` for ``exp(-lam * cost)``: rows sum to 1, columns to
    ``column_mass``; stops when a row sum changes by less than ``tol`` in one iteration (as
    PT-MAP's code) or after ``max_iter`` iterations."""
    log_plan = -lam * cost
    log_plan = log_plan - torch.logsumexp(log_plan.reshape(-1), dim=0)
    log_mass = math.log(column_mass)
    for _ in range(max_iter):
        row_before = torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - row_before
        log_plan = log_plan + (log_mass - torch.logsumexp(log_plan, dim=0, keepdim=True))
        row_after = torch.logsumexp(log_plan, dim=1, keepdim=True)
        if float((row_before.exp() - row_after.exp()).abs().max()) < tol:
            break
    return log_plan


class PTMAP(TransductiveFeatureLearner):
    """PT-MAP on a frozen backbone's pooled features (module doc).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        power: the power transform's exponent (paper: 0.5); ``None`` skips the transform.
        normalize: ``None``, ``"l2"`` or ``"l2_center"`` (module doc).
        steps: centre updates (the authors' code: 20).
        lr: rate ``alpha`` of the centre updates (paper: 0.2).
        lam: Sinkhorn regularisation ``lambda`` (paper: 10).
        sinkhorn_tol, sinkhorn_iters: Sinkhorn stopping rule.
    """

    def __init__(
        self,
        backbone: nn.Module,
        power: Optional[float] = 0.5,
        normalize: Optional[str] = "l2_center",
        steps: int = 20,
        lr: float = 0.2,
        lam: float = 10.0,
        sinkhorn_tol: float = 1e-6,
        sinkhorn_iters: int = 1000,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"PTMAP: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if power is not None:
            check_positive("PTMAP", power=power)
        check_positive("PTMAP", lr=lr, lam=lam, sinkhorn_tol=sinkhorn_tol, sinkhorn_iters=sinkhorn_iters)
        if int(steps) < 0:
            raise ConfigError(f"PTMAP: steps must be >= 0, got {steps}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.power = None if power is None else float(power)
        self.normalize = normalize
        self.steps = int(steps)
        self.lr = float(lr)
        self.lam = float(lam)
        self.sinkhorn_tol = float(sinkhorn_tol)
        self.sinkhorn_iters = int(sinkhorn_iters)

    def preprocess(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Power transform and normalisation of the episode's support and query features."""
        if self.power is not None:
            support, query = power_transform(support, self.power), power_transform(query, self.power)
        if self.normalize is not None:
            support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
        if self.normalize == "l2_center":
            support = F.normalize(support - support.mean(dim=0, keepdim=True), dim=1)
            query = F.normalize(query - query.mean(dim=0, keepdim=True), dim=1)
        return support, query

    def _log_assignments(self, query: Tensor, centres: Tensor) -> Tensor:
        cost = torch.cdist(query, centres) ** 2
        return sinkhorn_log(cost, self.lam, query.shape[0] / centres.shape[0], self.sinkhorn_tol, self.sinkhorn_iters)

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        support, query = self.preprocess(support, query)
        onehot = one_hot(labels, num_classes, support.dtype)
        centres = (onehot.transpose(0, 1) @ support) / onehot.sum(dim=0)[:, None]
        features = torch.cat([support, query])
        for _ in range(self.steps):
            assignments = torch.cat([onehot, self._log_assignments(query, centres).exp()])
            estimate = (assignments.transpose(0, 1) @ features) / assignments.sum(dim=0)[:, None]
            centres = centres + self.lr * (estimate - centres)
        return self._log_assignments(query, centres).log_softmax(dim=1)
