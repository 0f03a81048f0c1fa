"""Prototypical networks (Snell et al., NeurIPS 2017), with SimpleShot normalisation (Wang et al. 2019).

A class is represented by the mean feature (prototype) of its support examples; a query's
logit for a class is its negative distance to the prototype (squared Euclidean, or cosine
distance ``1 - cos``), divided by a temperature. Binary and multi-label tasks get a positive
and a negative prototype per label, as in MedIMeta's ProtoNet, and the logit of a label is
``log p(pos) - log p(neg)`` for a softmax over that pair, i.e. ``(-d(pos) + d(neg)) / T``, so
its sigmoid is the two-prototype softmax probability of the positive prototype.

SimpleShot's "CL2N" normalisation centres features (by a mean feature computed on training
data, set with :meth:`ProtoNet.set_feature_mean`, or by the support mean) and L2-normalises them.

The prototype helpers work on whole tensors (one-hot matrix products, no boolean indexing), so
they run under ``torch.func.vmap``; Proto-MAML (:mod:`medmeta.learners.maml`) reuses them.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.base import EpisodeScope, Predictor
from medmeta.learners.checks import (
    check_episodes,
    check_query_features,
    check_support_features,
    feature_dim,
)
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.heads import task_loss
from medmeta.tasks import Episode, TaskDescription

__all__ = [
    "ProtoNet",
    "Prototypes",
    "class_prototypes",
    "pairwise_distance",
    "prototype_logits",
    "prototype_head",
    "DISTANCES",
    "NORMALIZATIONS",
]

DISTANCES = ("euclidean", "cosine")
NORMALIZATIONS = (None, "l2", "simpleshot")


@dataclass
class Prototypes:
    """Class prototypes ``(C, D)``; ``negative`` is set for binary and multi-label tasks."""

    positive: Tensor
    negative: Optional[Tensor] = None


def prototype_membership(labels: Tensor, description: TaskDescription, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """0/1 membership matrices ``(N, C)`` of the positive (and negative) prototypes."""
    target = description.task_target
    if target.uses_sigmoid:
        pos = labels.to(dtype).reshape(labels.shape[0], -1)
        return pos, 1.0 - pos
    grid = torch.arange(description.num_classes, device=labels.device)
    return (labels.reshape(-1, 1) == grid).to(dtype), None


def _mean_by(membership: Tensor, features: Tensor) -> Tensor:
    counts = membership.sum(dim=0).clamp_min(1.0)
    return (membership.transpose(0, 1) @ features) / counts[:, None]


def class_prototypes(features: Tensor, labels: Tensor, description: TaskDescription) -> Prototypes:
    """Mean support feature per class (and per label's negatives for sigmoid tasks).

    Labels follow the episode encoding (:mod:`medmeta.tasks`); a class without examples gets a
    zero prototype, so check the support set first (:func:`medmeta.learners.checks.check_support`).
    """
    pos, neg = prototype_membership(labels, description, features.dtype)
    return Prototypes(_mean_by(pos, features), None if neg is None else _mean_by(neg, features))


def pairwise_distance(x: Tensor, prototypes: Tensor, distance: str = "euclidean") -> Tensor:
    """Distances ``(N, C)`` between rows of ``x`` and ``prototypes``.

    ``"euclidean"`` is the squared Euclidean distance (Snell et al.), ``"cosine"`` is
    ``1 - cosine similarity``.
    """
    if distance == "euclidean":
        sq = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ prototypes.transpose(0, 1)
        return (sq + (prototypes * prototypes).sum(dim=1)[None, :]).clamp_min(0.0)
    if distance == "cosine":
        return 1.0 - F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).transpose(0, 1)
    raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")


def prototype_logits(
    query: Tensor, prototypes: Prototypes, distance: str = "euclidean", temperature: "float | Tensor" = 1.0
) -> Tensor:
    """Logits ``-d(pos) / T`` (softmax tasks) or ``(-d(pos) + d(neg)) / T`` (sigmoid tasks)."""
    logits = -pairwise_distance(query, prototypes.positive, distance)
    if prototypes.negative is not None:
        logits = logits + pairwise_distance(query, prototypes.negative, distance)
    return logits / temperature


def prototype_head(prototypes: Prototypes) -> tuple[Tensor, Tensor]:
    """Linear head ``(W, b)`` equal to squared-Euclidean prototype logits (Proto-MAML init).

    Softmax tasks: ``W_c = 2 p_c``, ``b_c = -|p_c|^2`` (logits differ from ``-|x - p_c|^2`` by the
    per-row constant ``|x|^2``, which softmax ignores). Sigmoid tasks: ``W = 2 (p+ - p-)``,
    ``b = |p-|^2 - |p+|^2``, exactly ``-|x - p+|^2 + |x - p-|^2``.
    """
    pos = prototypes.positive
    if prototypes.negative is None:
        return 2.0 * pos, -(pos * pos).sum(dim=1)
    neg = prototypes.negative
    return 2.0 * (pos - neg), (neg * neg).sum(dim=1) - (pos * pos).sum(dim=1)


class ProtoNet(FrozenFeatureLearner):
    """Prototypical network on a backbone's pooled features.

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        distance: ``"euclidean"`` (squared, pairwise) or ``"cosine"`` (``1 - cos``).
        normalize: ``None``; ``"l2"`` (unit-length features); ``"simpleshot"`` (centre by the
            stored feature mean, or by the support mean when none is set, then L2).
        temperature: logits are ``-distance / temperature``; ``None`` means 1 for Euclidean
            and 0.1 for cosine distance (cosine distances lie in [0, 2], too flat for softmax).
        learn_temperature: make the temperature a meta-learned parameter (stored as its log).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks in :meth:`meta_loss`.

    At test time the backbone is frozen (``frozen_backbone = True``): features are computed in
    eval mode (BatchNorm running statistics), so they can be cached by protocols.
    :meth:`meta_loss` trains the backbone episodically (Snell et al.).
    """

    training_kind = "episodic"
    feature_mean: Tensor
    has_feature_mean: Tensor
    log_temperature: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        normalize: Optional[str] = None,
        temperature: Optional[float] = None,
        learn_temperature: bool = False,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"ProtoNet: distance must be one of {DISTANCES}, got {distance!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"ProtoNet: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if temperature is None:
            temperature = 1.0 if distance == "euclidean" else 0.1
        if not temperature > 0:
            raise ValueError(f"ProtoNet: temperature must be positive, got {temperature}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.distance = distance
        self.normalize = normalize
        self.ordinal_loss = ordinal_loss
        log_t = torch.tensor(float(temperature)).log()
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("has_feature_mean", torch.tensor(False))

    # -- configuration --------------------------------------------------------------------
    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def set_feature_mean(self, mean: Optional[Tensor]) -> None:
        """Set (or clear with ``None``) the SimpleShot centring mean, e.g. of training features.

        A ``(N, D)`` tensor of features is averaged; a ``(D,)`` tensor is taken as the mean.
        """
        if mean is None:
            self.has_feature_mean.fill_(False)
            self.feature_mean.zero_()
            return
        mean = mean.detach()
        if mean.ndim == 2:
            mean = mean.mean(dim=0)
        if mean.shape != (self.num_features,):
            raise ValueError(f"set_feature_mean: expected ({self.num_features},) or (N, {self.num_features}), got {tuple(mean.shape)}")
        self.feature_mean.copy_(mean)
        self.has_feature_mean.fill_(True)

    def _normalizer(self, support_features: Tensor) -> Callable[[Tensor], Tensor]:
        if self.normalize is None:
            return lambda f: f
        if self.normalize == "l2":
            return lambda f: F.normalize(f, dim=1)
        if bool(self.has_feature_mean):
            centre = self.feature_mean.to(support_features.dtype)
        else:
            centre = support_features.mean(dim=0)
        return lambda f: F.normalize(f - centre, dim=1)

    def _episode_logits(self, support_f: Tensor, support_y: Tensor, query_f: Tensor, description: TaskDescription) -> Tensor:
        norm = self._normalizer(support_f)
        protos = class_prototypes(norm(support_f), support_y, description)
        return prototype_logits(norm(query_f), protos, self.distance, self.temperature.to(query_f.dtype))

    # -- inference ------------------------------------------------------------------------
    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        norm = self._normalizer(support_features)
        protos = class_prototypes(norm(support_features), support_labels, description)
        temperature = self.temperature.detach().to(support_features.dtype)

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            return prototype_logits(norm(query_features), protos, self.distance, temperature)

        return predict

    # -- training -------------------------------------------------------------------------
    def query_logits(self, episodes: Sequence[Episode]) -> list[Tensor]:
        """Differentiable query logits of every episode (backbone in its current mode)."""
        check_episodes(episodes)
        out = []
        for ep in episodes:
            n = ep.support_images.shape[0]
            if ep.support_images.shape[1:] == ep.query_images.shape[1:]:
                feats = self.backbone(torch.cat([ep.support_images, ep.query_images]))
                support_f, query_f = feats[:n], feats[n:]
            else:
                support_f, query_f = self.backbone(ep.support_images), self.backbone(ep.query_images)
            out.append(self._episode_logits(support_f, ep.support_labels, query_f, ep.description))
        return out

    def episode_losses(self, episodes: Sequence[Episode]) -> Tensor:
        """Query loss of every episode, ``(E,)``, differentiable."""
        logits = self.query_logits(episodes)
        return torch.stack(
            [
                task_loss(lg, ep.query_labels, ep.description.task_target, ordinal_loss=self.ordinal_loss)
                for lg, ep in zip(logits, episodes)
            ]
        )

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean query loss over the meta-batch (episodic training, Snell et al.)."""
        return self.episode_losses(episodes).mean()

    def meta_backward(
        self, episodes: Sequence[Episode], scale: Optional[float] = None, episode_scope: Optional[EpisodeScope] = None
    ) -> Tensor:
        """The meta-gradient of :meth:`meta_loss`, accumulated episode by episode (one graph alive at
        a time); each episode runs inside ``episode_scope(episode)``. See :meth:`Learner.meta_backward`."""
        check_episodes(episodes)
        scale = 1.0 / len(episodes) if scale is None else float(scale)
        total: Optional[Tensor] = None
        for ep in episodes:
            with episode_scope(ep) if episode_scope is not None else nullcontext():
                loss = self.episode_losses([ep])[0]
                (loss * scale).backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total / len(episodes)

