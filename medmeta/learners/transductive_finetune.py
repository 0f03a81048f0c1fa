"""Transductive fine-tuning (Dhillon, Chaudhari, Ravichandran and Soatto, "A Baseline for Few-Shot
Image Classification", ICLR 2020).

A copy of the backbone gets a prototype head (the paper's support-based initialisation: one
weight vector per class, initialised with the support mean feature) and the backbone and head
are fine-tuned with Adam on

    CE(support) + entropy_weight * mean entropy of the query predictions

(the paper's transductive term: confident predictions on the unlabelled query set). Logits are
``temperature * cos(z, w)`` (``"cosine"``, the paper's normalised head) or
``-temperature * |z - w|`` (``"l2"``, easyfsl's ``TransductiveFinetuning``). The copy stays in
eval mode (BatchNorm keeps its pretrained statistics: a few-shot support set is too small a batch
for batch statistics), and every step uses the whole support and query sets. The learner's own
backbone never changes, so episodes are independent.

With ``backbone_lr=0`` only the head is tuned: the backbone is then frozen
(``frozen_backbone`` is True, protocols embed every image once), and with easyfsl's settings
(``distance="l2"``, ``temperature=1``) this learner equals easyfsl's ``TransductiveFinetuning``
(which tunes prototypes only) on the same features. Binary and multi-label tasks get a positive
and a negative weight vector per label, as ProtoNet: the label's logit is
``s(z, w+) - s(z, w-)`` for the scaled similarity ``s``, its loss the binary cross-entropy and
its query entropy the binary entropy of the sigmoid. Ordinal tasks are treated as multi-class.
"""
from __future__ import annotations

import copy
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.base import Learner, Predictor
from medmeta.learners.checks import (
    check_query,
    check_query_features,
    check_support,
    check_support_features,
    feature_dim,
)
from medmeta.learners.heads import task_loss, task_probabilities
from medmeta.learners.protonet import class_prototypes
from medmeta.learners.transductive import check_positive
from medmeta.modes import module_mode
from medmeta.tasks import TaskDescription

__all__ = ["TransductiveFineTune", "PrototypeHead", "query_entropy"]

DISTANCES = ("cosine", "l2")
OPTIMIZERS = ("adam", "adamw", "sgd")


class PrototypeHead(nn.Module):
    """Logits from similarities to learnable class vectors (positive, and negative for sigmoid tasks)."""

    def __init__(self, positive: Tensor, negative: Optional[Tensor], distance: str, temperature: float) -> None:
        super().__init__()
        self.positive = nn.Parameter(positive.detach().clone())
        self.negative = None if negative is None else nn.Parameter(negative.detach().clone())
        self.distance = distance
        self.temperature = temperature

    def _similarity(self, features: Tensor, weights: Tensor) -> Tensor:
        if self.distance == "cosine":
            return F.normalize(features, dim=1) @ F.normalize(weights, dim=1).transpose(0, 1)
        return -torch.cdist(features, weights)

    def forward(self, features: Tensor) -> Tensor:
        logits = self._similarity(features, self.positive)
        if self.negative is not None:
            logits = logits - self._similarity(features, self.negative)
        return self.temperature * logits


def query_entropy(logits: Tensor, description: TaskDescription) -> Tensor:
    """Mean entropy of the predictions: softmax rows, or the binary entropy of each sigmoid output."""
    probs = task_probabilities(logits, description.task_target)
    if description.task_target.uses_sigmoid:
        probs = torch.stack([probs, 1.0 - probs], dim=-1)
    return -(probs * (probs + 1e-12).log()).sum(dim=-1).mean()


class TransductiveFineTune(Learner):
    """Transductive fine-tuning of a backbone copy and a prototype head per episode (module doc).

    Args:
        backbone: feature extractor with ``num_features``.
        steps: optimisation steps per episode (paper: 25).
        lr: learning rate of the head (and of the backbone unless ``backbone_lr`` is given; paper: 5e-5).
        backbone_lr: learning rate of the backbone; ``0`` tunes the head only (frozen backbone).
        distance: ``"cosine"`` (paper) or ``"l2"`` (easyfsl).
        temperature: logit scale.
        entropy_weight: weight of the query entropy (paper: 1).
        optimizer: ``"adam"`` (paper), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: optimiser weight decay.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks' support loss.
    """

    transductive: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        steps: int = 25,
        lr: float = 5e-5,
        backbone_lr: Optional[float] = None,
        distance: str = "cosine",
        temperature: float = 10.0,
        entropy_weight: float = 1.0,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ConfigError(f"TransductiveFineTune: distance must be one of {DISTANCES}, got {distance!r}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"TransductiveFineTune: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if ordinal_loss not in ("ce", "soft"):
            raise ConfigError(f"TransductiveFineTune: ordinal_loss must be 'ce' or 'soft', got {ordinal_loss!r}")
        if int(steps) < 0:
            raise ConfigError(f"TransductiveFineTune: steps must be >= 0, got {steps}")
        check_positive("TransductiveFineTune", lr=lr, temperature=temperature)
        for name, value in (("backbone_lr", 0.0 if backbone_lr is None else backbone_lr), ("entropy_weight", entropy_weight), ("weight_decay", weight_decay)):
            if not float(value) >= 0:
                raise ConfigError(f"TransductiveFineTune: {name} must be >= 0, got {value!r}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.steps = int(steps)
        self.lr = float(lr)
        self.backbone_lr = self.lr if backbone_lr is None else float(backbone_lr)
        self.distance = distance
        self.temperature = float(temperature)
        self.entropy_weight = float(entropy_weight)
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.ordinal_loss = ordinal_loss
        # Head-only tuning depends on images only through the frozen backbone's features.
        self.frozen_backbone = self.backbone_lr == 0

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)

    def _tune(
        self,
        features: Callable[[Tensor], Tensor],
        parameters: list[nn.Parameter],
        support_x: Tensor,
        support_labels: Tensor,
        query_x: Tensor,
        description: TaskDescription,
    ) -> PrototypeHead:
        """A prototype head (and, in place, ``parameters`` of ``features``) fitted transductively."""
        with torch.no_grad():
            protos = class_prototypes(features(support_x), support_labels, description)
        head = PrototypeHead(protos.positive, protos.negative, self.distance, self.temperature)
        groups: list[dict] = [{"params": list(head.parameters()), "lr": self.lr}]
        if parameters and self.backbone_lr > 0:
            groups.append({"params": parameters, "lr": self.backbone_lr})
        optimizer = self._make_optimizer(groups)
        n = len(support_x)
        same_shape = support_x.shape[1:] == query_x.shape[1:]
        with torch.enable_grad():
            for _ in range(self.steps):
                if same_shape:
                    feats = features(torch.cat([support_x, query_x]))
                    support_f, query_f = feats[:n], feats[n:]
                else:
                    support_f, query_f = features(support_x), features(query_x)
                loss = task_loss(head(support_f), support_labels, description.task_target, ordinal_loss=self.ordinal_loss)
                if self.entropy_weight > 0 and len(query_f) > 0:
                    loss = loss + self.entropy_weight * query_entropy(head(query_f), description)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        head.requires_grad_(False)
        return head

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Check the support set; the predictor fine-tunes on the support set and the whole query set."""
        check_support(support_images, support_labels, description)
        if self.frozen_backbone:
            return self._frozen_adapt(support_images, support_labels, description)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            model = copy.deepcopy(self.backbone).eval()
            parameters = [p for p in model.parameters() if p.requires_grad]
            head = self._tune(model, parameters, support_images, support_labels, query_images, description)
            model.requires_grad_(False)
            with torch.no_grad():
                return head(model(query_images))

        return predict

    def _embed(self, images: Tensor) -> Tensor:
        with module_mode(self.backbone, False), torch.no_grad():
            return self.backbone(images)

    def _frozen_adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        features_predictor = self.adapt_features(self._embed(support_images), support_labels, description)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            return features_predictor(self._embed(query_images))

        return predict

    def embed(self, images: Tensor) -> Tensor:
        """Backbone features in eval mode (the feature path of head-only tuning, ``backbone_lr=0``)."""
        return self._embed(images)

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Head-only transductive tuning on precomputed features (``backbone_lr=0``)."""
        if not self.frozen_backbone:
            raise ConfigError(
                "TransductiveFineTune: adapt_features tunes the head only; this learner also tunes the "
                f"backbone (backbone_lr={self.backbone_lr}), so it needs images (adapt)"
            )
        check_support_features(support_features, support_labels, description, self.num_features)
        support = support_features.detach()

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            query = query_features.detach()
            head = self._tune(lambda f: f, [], support, support_labels, query, description)
            with torch.no_grad():
                return head(query)

        return predict
