"""Linear probe on frozen features, the "Baseline" of Chen et al. (ICLR 2019, "A Closer Look at Few-shot Classification").

The backbone is frozen; a new linear head per task (one output for binary tasks, one per class
otherwise) is fitted to the cached support features by minimising the task's loss
(:func:`medmeta.learners.heads.task_loss`) plus an L2 penalty ``weight_decay / 2 * |W|^2``.
The problem is convex (logistic / softmax regression), so a full-batch L-BFGS solve from a
zero head is fast and deterministic; a fixed number of full-batch Adam steps is the
alternative. Optional feature normalisation: L2, or standardisation by support statistics.

The weight decay can be chosen per episode from the support set alone
(``select_weight_decay=True``, registered as ``linear_probe_cv``): stratified K-fold
cross-validation within the support set over a grid of weight decays (mean held-out task loss,
the loss the head is trained with), then a refit on the whole support set with the best value.
Folds are built in a canonical order of the support set (:func:`canonical_order`), so the
choice does not depend on the order of the support examples; the query set is never seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.base import Predictor, with_fixed_options
from medmeta.learners.checks import check_query_features, check_support_features, feature_dim
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.heads import task_loss
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = [
    "LinearProbe",
    "LinearProbeCV",
    "fit_linear_head",
    "WeightDecaySelection",
    "canonical_order",
    "stratified_folds",
    "cross_validate_weight_decay",
    "DEFAULT_WEIGHT_DECAYS",
]

SOLVERS = ("lbfgs", "adam")
FEATURE_NORMALIZATIONS = (None, "l2", "standardize")
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""The weight decays :class:`LinearProbeCV` tries when ``weight_decays`` is not given."""


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


def _normalizer(normalize: Optional[str], features: Tensor) -> Callable[[Tensor], Tensor]:
    """Feature normalisation fitted on ``features`` (standardisation uses their statistics)."""
    if normalize is None:
        return lambda f: f
    if normalize == "l2":
        return lambda f: F.normalize(f, dim=1)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    return lambda f: (f - mean) / std


def canonical_order(items: Tensor, labels: Tensor) -> Tensor:
    """A permutation of the rows that depends only on their contents, not their order.

    Rows are sorted by their labels (lexicographically for 0/1 label vectors), ties by a fixed
    random projection of the flattened row (``float64``; equal keys mean equal rows with equal
    labels, which are interchangeable). Learners that split the support set (cross-validation
    folds, pseudo-episodes) split it in this order, so permuting the support set changes nothing.
    """
    flat = items.detach().reshape(len(items), -1).to("cpu", torch.float64)
    g = torch.Generator().manual_seed(20240501)
    direction = torch.randn(flat.shape[1], generator=g, dtype=torch.float64)
    order = torch.argsort(flat @ direction, stable=True)
    lab = labels.detach().reshape(len(labels), -1).to("cpu", torch.float64)
    for col in reversed(range(lab.shape[1])):
        order = order[torch.argsort(lab[order, col], stable=True)]
    return order


def stratified_folds(labels: Tensor, description: TaskDescription, folds: int) -> list[Tensor]:
    """Held-out index sets of stratified cross-validation within a support set.

    Multi-class, ordinal and binary tasks: in :func:`canonical_order` of the labels' rows (pass
    the support features through ``canonical_order`` first to make the folds order-invariant),
    the ``j``-th example of each class goes to fold ``j % k`` with ``k = min(folds, smallest
    class count)``, so every training part holds every class; when the smallest class has at
    most ``folds`` examples this is leave-one-out per class. Multi-label tasks: rows in the
    given order are dealt round-robin into ``k = min(folds, N)`` folds (pass them sorted by
    label pattern for a rough stratification). Returns ``[]`` when ``k < 2`` (no CV possible).
    """
    n = len(labels)
    if description.task_target is TaskTarget.MULTILABEL_CLASSIFICATION:
        k = min(int(folds), n)
        if k < 2:
            return []
        assign = torch.arange(n) % k
    else:
        cls = labels.reshape(n, -1)[:, 0].to("cpu").long() if labels.ndim > 1 else labels.to("cpu").long()
        counts = torch.bincount(cls, minlength=2)
        present = counts[counts > 0]
        k = min(int(folds), int(present.min())) if len(present) else 0
        if k < 2:
            return []
        assign = torch.empty(n, dtype=torch.long)
        for c in torch.unique(cls):
            members = torch.nonzero(cls == c).reshape(-1)
            assign[members] = torch.arange(len(members)) % k
    return [torch.nonzero(assign == f).reshape(-1) for f in range(k)]


@dataclass(frozen=True)
class WeightDecaySelection:
    """The outcome of cross-validating the weight decay on one support set.

    Attributes:
        weight_decay: the chosen value (the fallback when ``folds == 0``).
        scores: mean held-out task loss per candidate (empty when no CV was possible).
        folds: the number of folds used (0: the support set was too small, fallback used).
    """

    weight_decay: float
    scores: dict[float, float] = field(default_factory=dict)
    folds: int = 0


def cross_validate_weight_decay(
    features: Tensor,
    labels: Tensor,
    description: TaskDescription,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    folds: int = 5,
    fallback: float = 1e-3,
    normalize: Optional[str] = None,
    **fit_kwargs: Any,
) -> WeightDecaySelection:
    """Choose the weight decay of :func:`fit_linear_head` by cross-validation within a support set.

    For every candidate, a head is fitted on each fold's training part (normalisation fitted
    there too) and scored by the mean task loss on its held-out part; the candidate with the
    lowest loss over all held-out rows wins, ties going to the larger weight decay (the simpler
    head). Folds come from :func:`stratified_folds` on the rows in :func:`canonical_order`, so
    the result does not depend on the order of the support set. ``fallback`` is returned when
    no fold split is possible (a class with a single example). ``fit_kwargs`` go to
    :func:`fit_linear_head` (``solver``, ``max_iter``, ``lr``, ``ordinal_loss``).
    """
    candidates = sorted({float(w) for w in weight_decays})
    if not candidates or min(candidates) < 0 or not all(math.isfinite(w) for w in candidates):
        raise ConfigError(f"weight_decays: expected a non-empty list of finite values >= 0, got {list(weight_decays)}")
    features = features.detach()
    order = canonical_order(features, labels).to(features.device)
    features, labels = features[order], labels[order]
    held_out = stratified_folds(labels, description, folds)
    if not held_out:
        return WeightDecaySelection(float(fallback), {}, 0)
    target = description.task_target
    ordinal_loss = fit_kwargs.get("ordinal_loss", "ce")
    totals = {w: 0.0 for w in candidates}
    everything = torch.arange(len(labels))
    for test_idx in held_out:
        train_idx = everything[~torch.isin(everything, test_idx)]
        test_idx, train_idx = test_idx.to(features.device), train_idx.to(features.device)
        norm = _normalizer(normalize, features[train_idx])
        train_f, test_f = norm(features[train_idx]), norm(features[test_idx])
        for w in candidates:
            weight, bias = fit_linear_head(train_f, labels[train_idx], description, weight_decay=w, **fit_kwargs)
            loss = task_loss(F.linear(test_f, weight, bias), labels[test_idx], target, ordinal_loss=ordinal_loss)
            totals[w] += float(loss) * len(test_idx)
    scores = {w: totals[w] / len(labels) for w in candidates}
    best = min(scores.values())
    chosen = max(w for w in candidates if scores[w] <= best)  # ties: the larger weight decay
    return WeightDecaySelection(chosen, scores, len(held_out))


class LinearProbe(FrozenFeatureLearner):
    """A new linear head per task on frozen backbone features (solved on cached features).

    Args:
        backbone: feature extractor with ``num_features``; used in eval mode, never updated.
        weight_decay: L2 penalty on the head's weights (the support set is tiny; some is needed
            to keep the solution finite on separable data). With ``select_weight_decay``, the
            fallback used when the support set is too small to cross-validate.
        solver: ``"lbfgs"`` (default, full-batch, strong-Wolfe line search) or ``"adam"``.
        max_iter: L-BFGS iterations or Adam steps.
        lr: solver step size (L-BFGS default 1, Adam default 1e-2).
        normalize: ``None``, ``"l2"`` or ``"standardize"`` (support mean and std per feature).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.
        select_weight_decay: choose the weight decay per episode by cross-validation within the
            support set (:func:`cross_validate_weight_decay`) and refit on the whole support set.
        weight_decays: the candidates (``None``: :data:`DEFAULT_WEIGHT_DECAYS`).
        cv_folds: at most this many stratified folds (fewer when a class has fewer examples).

    With ``select_weight_decay``, :attr:`last_selection` holds the latest episode's
    :class:`WeightDecaySelection` (chosen value, held-out loss per candidate, folds).
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
        select_weight_decay: bool = False,
        weight_decays: Optional[Sequence[float]] = None,
        cv_folds: int = 5,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if solver not in SOLVERS:
            raise ValueError(f"{name}: solver must be one of {SOLVERS}, got {solver!r}")
        if normalize not in FEATURE_NORMALIZATIONS:
            raise ValueError(f"{name}: normalize must be one of {FEATURE_NORMALIZATIONS}, got {normalize!r}")
        if weight_decay < 0 or max_iter < 1:
            raise ValueError(f"{name}: need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
        grid = DEFAULT_WEIGHT_DECAYS if weight_decays is None else tuple(float(w) for w in weight_decays)
        if not grid or min(grid) < 0 or not all(math.isfinite(w) for w in grid):
            raise ConfigError(f"{name}: weight_decays must be a non-empty list of finite values >= 0, got {weight_decays}")
        if int(cv_folds) < 2:
            raise ConfigError(f"{name}: cv_folds must be >= 2, got {cv_folds}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.weight_decay = float(weight_decay)
        self.solver = solver
        self.max_iter = int(max_iter)
        self.lr = lr
        self.normalize = normalize
        self.ordinal_loss = ordinal_loss
        self.select_weight_decay = bool(select_weight_decay)
        self.weight_decays = grid
        self.cv_folds = int(cv_folds)
        self.last_selection: Optional[WeightDecaySelection] = None

    def _normalizer(self, support_features: Tensor) -> Callable[[Tensor], Tensor]:
        return _normalizer(self.normalize, support_features)

    def choose_weight_decay(
        self, support_features: Tensor, support_labels: Tensor, description: TaskDescription
    ) -> WeightDecaySelection:
        """Cross-validate the weight decay on a support set (features and labels only)."""
        return cross_validate_weight_decay(
            support_features,
            support_labels,
            description,
            self.weight_decays,
            folds=self.cv_folds,
            fallback=self.weight_decay,
            normalize=self.normalize,
            solver=self.solver,
            max_iter=self.max_iter,
            lr=self.lr,
            ordinal_loss=self.ordinal_loss,
        )

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        support_features = support_features.detach()
        weight_decay = self.weight_decay
        if self.select_weight_decay:
            self.last_selection = self.choose_weight_decay(support_features, support_labels, description)
            weight_decay = self.last_selection.weight_decay
            order = canonical_order(support_features, support_labels).to(support_features.device)
            support_features, support_labels = support_features[order], support_labels[order]
        norm = self._normalizer(support_features)
        weight, bias = fit_linear_head(
            norm(support_features),
            support_labels,
            description,
            weight_decay=weight_decay,
            solver=self.solver,
            max_iter=self.max_iter,
            lr=self.lr,
            ordinal_loss=self.ordinal_loss,
        )

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            return F.linear(norm(query_features.to(weight.dtype)), weight, bias)

        return predict


class LinearProbeCV(LinearProbe):
    """:class:`LinearProbe` whose weight decay is chosen per episode by cross-validation within
    the support set (``select_weight_decay`` fixed to True; registered as ``linear_probe_cv``).

    Takes LinearProbe's arguments; ``weight_decays`` (default :data:`DEFAULT_WEIGHT_DECAYS`) are
    the candidates, ``cv_folds`` the most folds, ``weight_decay`` the fallback for support sets
    with a single example of some class.
    """

    fixed_options: ClassVar[dict[str, Any]] = {"select_weight_decay": True}

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **with_fixed_options(type(self), kwargs, instead="LinearProbe"))
