"""Linear probe on frozen features, the "Baseline" of Chen et al. (ICLR 2019, "A Closer Look at Few-shot Classification").

The backbone is frozen; a new linear head per task (one output for binary tasks, one per class
otherwise) is fitted to the cached support features by minimising the task's loss
(:func:`medmeta.learners.heads.task_loss`) plus an L2 penalty ``weight_decay / 2 * |W|^2``.
The problem is convex (logistic / softmax regression), so a full-batch L-BFGS solve from a
zero head is fast and deterministic; a fixed number of full-batch Adam steps is the
alternative. Optional feature normalisation: L2, or standardisation by support statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.base import Predictor
from medmeta.learners.checks import check_query_features, check_support_features, feature_dim
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.heads import task_loss
from medmeta.tasks import TaskDescription

__all__ = ["LinearProbe", "fit_linear_head"]

SOLVERS = ("lbfgs", "adam")
FEATURE_NORMALIZATIONS = (None, "l2", "standardize")


def fit_linear_head(
    features: Tensor,
    labels: Tensor,
    description: TaskDescription,
    weight_decay: float = 1e-3,
    solver: str = "lbfgs",
    max_iter: int = 100,
    lr: Optional[float] = None,
    ordinal_loss: str = "ce",
) -> tuple[Tensor, Tensor]:
    """Fit ``(W, b)`` on fixed features; returns detached tensors on the features' device/dtype."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    features = features.detach()
    weight = torch.zeros(description.num_outputs, features.shape[1], dtype=features.dtype, device=features.device)
    bias = torch.zeros(description.num_outputs, dtype=features.dtype, device=features.device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    target = description.task_target

    def objective() -> Tensor:
        loss = task_loss(F.linear(features, weight, bias), labels, target, ordinal_loss=ordinal_loss)
        return loss + 0.5 * weight_decay * (weight * weight).sum()

    with torch.enable_grad():
        if solver == "lbfgs":
            opt = torch.optim.LBFGS(
                [weight, bias],
                lr=1.0 if lr is None else lr,
                max_iter=max_iter,
                tolerance_grad=1e-6,
                tolerance_change=1e-9,
                history_size=10,
                line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                opt.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            adam = torch.optim.Adam([weight, bias], lr=1e-2 if lr is None else lr)
            for _ in range(max_iter):
                adam.zero_grad()
                objective().backward()
                adam.step()
    return weight.detach(), bias.detach()


class LinearProbe(FrozenFeatureLearner):
    """A new linear head per task on frozen backbone features (solved on cached features).

    Args:
        backbone: feature extractor with ``num_features``; used in eval mode, never updated.
        weight_decay: L2 penalty on the head's weights (the support set is tiny; some is needed
            to keep the solution finite on separable data).
        solver: ``"lbfgs"`` (default, full-batch, strong-Wolfe line search) or ``"adam"``.
        max_iter: L-BFGS iterations or Adam steps.
        lr: solver step size (L-BFGS default 1, Adam default 1e-2).
        normalize: ``None``, ``"l2"`` or ``"standardize"`` (support mean and std per feature).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.
    """

    def __init__(
        self,
        backbone: nn.Module,
        weight_decay: float = 1e-3,
        solver: str = "lbfgs",
        max_iter: int = 100,
        lr: Optional[float] = None,
        normalize: Optional[str] = None,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"LinearProbe: solver must be one of {SOLVERS}, got {solver!r}")
        if normalize not in FEATURE_NORMALIZATIONS:
            raise ValueError(f"LinearProbe: normalize must be one of {FEATURE_NORMALIZATIONS}, got {normalize!r}")
        if weight_decay < 0 or max_iter < 1:
            raise ValueError(f"LinearProbe: need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.weight_decay = float(weight_decay)
        self.solver = solver
        self.max_iter = int(max_iter)
        self.lr = lr
        self.normalize = normalize
        self.ordinal_loss = ordinal_loss

    def _normalizer(self, support_features: Tensor):
        if self.normalize is None:
            return lambda f: f
        if self.normalize == "l2":
            return lambda f: F.normalize(f, dim=1)
        mean = support_features.mean(dim=0)
        std = support_features.std(dim=0, unbiased=False).clamp_min(1e-6)
        return lambda f: (f - mean) / std

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        support_features = support_features.detach()
        norm = self._normalizer(support_features)
        weight, bias = fit_linear_head(
            norm(support_features),
            support_labels,
            description,
            weight_decay=self.weight_decay,
            solver=self.solver,
            max_iter=self.max_iter,
            lr=self.lr,
            ordinal_loss=self.ordinal_loss,
        )

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            return F.linear(norm(query_features.to(weight.dtype)), weight, bias)

        return predict
