"""TIM: transductive information maximisation (Boudiaf et al., NeurIPS 2020), and alpha-TIM
(Veilleux et al., "Realistic Evaluation of Transductive Few-Shot Learning", NeurIPS 2021).

A classifier ``W`` (one weight vector per class, initialised with the support prototypes) is
fitted on frozen features by gradient descent (TIM-GD: Adam) on

    ce_weight * CE(support) - (marginal_weight * H(Y_Q) - conditional_weight * H(Y_Q | X_Q))

i.e. support cross-entropy minus the mutual information between query features and their
predicted labels: confident query predictions (low conditional entropy) whose marginal over the
query set is spread out (high marginal entropy). The marginal term assumes roughly balanced query
classes; alpha-TIM replaces both query entropies by Tsallis alpha-entropies
``H_a(p) = (1 - sum p^a) / (a - 1)``, which penalise imbalance much less and so suit
imbalanced query sets (``alpha=None`` is Shannon entropy, plain TIM).

Logits: ``"euclidean"`` is the paper's ``-temperature / 2 * |z - w|^2`` on L2-normalised
features; ``"cosine"`` is ``temperature * cos(z, w)`` (easyfsl's ``TIM``). Defaults are the
paper's TIM-GD settings (1000 Adam steps, lr 1e-4, temperature 15, weights 0.1 / 1 / 0.1);
easyfsl's defaults differ (cosine, 50 steps, temperature 10, weights 1 / 1 / 0.1) and with those
passed explicitly this learner equals easyfsl's ``TIM`` on the same features.
Binary and multi-label tasks: per label, negatives against positives (see
:mod:`medmeta.learners.transductive`); the K two-class problems of a multi-label task are fitted
together (Adam is elementwise, so each follows exactly its own trajectory).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.base import Predictor
from medmeta.learners.checks import check_query_features, check_support_features, feature_dim
from medmeta.learners.transductive import TransductiveFeatureLearner, check_positive, one_hot
from medmeta.tasks import TaskDescription

__all__ = ["TIM", "AlphaTIM", "tsallis_entropy", "shannon_entropy"]

DISTANCES = ("euclidean", "cosine")
NORMALIZATIONS = (None, "l2")


def shannon_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy along the last dimension (``p log p`` with ``+1e-12`` inside the log)."""
    return -(probs * torch.log(probs + 1e-12)).sum(dim=-1)


def tsallis_entropy(probs: Tensor, alpha: float) -> Tensor:
    """Tsallis alpha-entropy ``(1 - sum p^alpha) / (alpha - 1)`` along the last dimension
    (Shannon entropy in the limit ``alpha -> 1``)."""
    return (1.0 - (probs + 1e-12).pow(alpha).sum(dim=-1)) / (alpha - 1.0)


class TIM(TransductiveFeatureLearner):
    """TIM-GD (and alpha-TIM with ``alpha``) on a frozen backbone's pooled features (module doc).

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        alpha: ``None`` for Shannon entropies (TIM); a positive value other than 1 for alpha-TIM.
        steps: Adam steps per episode (paper: 1000).
        lr: Adam learning rate of the class weights.
        temperature: logit scale (paper: 15).
        distance: ``"euclidean"`` (paper) or ``"cosine"`` (easyfsl).
        normalize: ``"l2"`` (unit-length features, paper) or ``None``.
        ce_weight, marginal_weight, conditional_weight: the loss weights (paper: 0.1, 1, 0.1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        alpha: Optional[float] = None,
        steps: int = 1000,
        lr: float = 1e-4,
        temperature: float = 15.0,
        distance: str = "euclidean",
        normalize: Optional[str] = "l2",
        ce_weight: float = 0.1,
        marginal_weight: float = 1.0,
        conditional_weight: float = 0.1,
    ) -> None:
        super().__init__()
        method = type(self).__name__
        if distance not in DISTANCES:
            raise ConfigError(f"{method}: distance must be one of {DISTANCES}, got {distance!r}")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"{method}: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if alpha is not None and (not float(alpha) > 0 or float(alpha) == 1.0):
            raise ConfigError(f"{method}: alpha must be None (Shannon, TIM) or a positive value other than 1, got {alpha!r}")
        if int(steps) < 0:
            raise ConfigError(f"{method}: steps must be >= 0, got {steps}")
        check_positive(method, lr=lr, temperature=temperature)
        for name, value in (("ce_weight", ce_weight), ("marginal_weight", marginal_weight), ("conditional_weight", conditional_weight)):
            if not float(value) >= 0:
                raise ConfigError(f"{method}: {name} must be >= 0, got {value!r}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.alpha = None if alpha is None else float(alpha)
        self.steps = int(steps)
        self.lr = float(lr)
        self.temperature = float(temperature)
        self.distance = distance
        self.normalize = normalize
        self.ce_weight = float(ce_weight)
        self.marginal_weight = float(marginal_weight)
        self.conditional_weight = float(conditional_weight)

    # -- the model ---------------------------------------------------------------------------
    def logits(self, features: Tensor, weights: Tensor) -> Tensor:
        """Logits ``(P, N, C)`` of features ``(N, D)`` for class weights ``(P, C, D)``."""
        if self.distance == "cosine":
            return self.temperature * torch.einsum(
                "nd,pcd->pnc", F.normalize(features, dim=1), F.normalize(weights, dim=2)
            )
        sq = (
            (features * features).sum(dim=1)[None, :, None]
            - 2.0 * torch.einsum("nd,pcd->pnc", features, weights)
            + (weights * weights).sum(dim=2)[:, None, :]
        )
        return -0.5 * self.temperature * sq

    def _entropy(self, probs: Tensor) -> Tensor:
        return shannon_entropy(probs) if self.alpha is None else tsallis_entropy(probs, self.alpha)

    def loss(self, weights: Tensor, support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
        """The TIM objective, summed over the ``P`` independent problems."""
        support_logp = self.logits(support, weights).log_softmax(dim=2)
        ce = -(onehot * support_logp).sum(dim=2).mean(dim=1)
        probs = self.logits(query, weights).softmax(dim=2)
        conditional = self._entropy(probs).mean(dim=1)
        marginal_probs = probs.mean(dim=1)
        if self.alpha is None:
            marginal = -(marginal_probs * torch.log(marginal_probs)).sum(dim=1)
        else:
            marginal = self._entropy(marginal_probs)
        loss = self.ce_weight * ce - (self.marginal_weight * marginal - self.conditional_weight * conditional)
        return loss.sum()

    def fit(self, support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
        """Class weights ``(P, C, D)`` fitted by Adam from the support prototypes.

        ``onehot`` is ``(P, Ns, C)``: the support labels of ``P`` problems on the same features.
        """
        counts = onehot.sum(dim=1).clamp_min(1.0)
        weights = (torch.einsum("pnc,nd->pcd", onehot, support) / counts[:, :, None]).clone()
        with torch.enable_grad():
            weights.requires_grad_(True)
            optimizer = torch.optim.Adam([weights], lr=self.lr)
            for _ in range(self.steps):
                loss = self.loss(weights, support, onehot, query)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return weights.detach()

    def _prepare(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1) if self.normalize == "l2" else features

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        support, query = self._prepare(support), self._prepare(query)
        onehot = one_hot(labels, num_classes, support.dtype)[None]
        return self.logits(query, self.fit(support, onehot, query))[0]

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """As :class:`TransductiveFeatureLearner`, with the per-label problems of sigmoid tasks
        fitted in one batch."""
        if not description.task_target.uses_sigmoid:
            return super().adapt_features(support_features, support_labels, description)
        check_support_features(support_features, support_labels, description, self.num_features)
        support = self._prepare(support_features.detach())
        labels = support_labels.detach().long()  # (Ns, K) 0/1
        onehot = torch.stack([1 - labels, labels], dim=2).transpose(0, 1).to(support.dtype)  # (K, Ns, 2)

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            if query_features.shape[0] == 0:
                return query_features.new_zeros((0, description.num_outputs))
            query = self._prepare(query_features.detach())
            logits = self.logits(query, self.fit(support, onehot, query))  # (K, Nq, 2)
            return (logits[:, :, 1] - logits[:, :, 0]).transpose(0, 1)

        return predict


class AlphaTIM(TIM):
    """alpha-TIM (Veilleux et al. 2021): :class:`TIM` with Tsallis alpha-entropies, for imbalanced
    query sets. Takes TIM's arguments; the defaults differ in ``alpha=2`` and in the support
    cross-entropy and conditional-entropy weights (1 and 1 instead of 0.1 and 0.1). The paper
    tunes alpha on validation episodes, so tune it for your data."""

    def __init__(
        self,
        backbone: nn.Module,
        alpha: Optional[float] = 2.0,
        steps: int = 1000,
        lr: float = 1e-4,
        temperature: float = 15.0,
        distance: str = "euclidean",
        normalize: Optional[str] = "l2",
        ce_weight: float = 1.0,
        marginal_weight: float = 1.0,
        conditional_weight: float = 1.0,
    ) -> None:
        super().__init__(
            backbone, alpha=alpha, steps=steps, lr=lr, temperature=temperature, distance=distance,
            normalize=normalize, ce_weight=ce_weight, marginal_weight=marginal_weight,
            conditional_weight=conditional_weight,
        )
