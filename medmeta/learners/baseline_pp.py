"""Baseline++ (Chen et al., ICLR 2019, "A Closer Look at Few-shot Classification"): a cosine classifier.

The logit of class ``c`` is ``scale * cos(x, w_c)``: only the angle between a feature and a class
weight counts, which reduces intra-class variation. It serves two roles:

* :class:`CosineHead`, a head per task kind, also the pre-training head of mm-PT
  (``MultiTaskPretrainer(head="cosine")``, i.e. Baseline++ pre-training when there is one task);
* :class:`BaselinePP`, the test-time learner: a new cosine classifier fitted on the frozen
  support features of each task (the backbone is never updated; features can be cached).

Binary and multi-label tasks get a positive and a negative weight per label, as ProtoNet has
a positive and a negative prototype: the logit of label ``k`` is
``scale * (cos(x, w+_k) - cos(x, w-_k))``, the log-odds of a softmax over the pair. Ordinal tasks
are treated as multi-class.

Fitting (:func:`fit_cosine_head`): the weights start at the normalised class prototypes
(positive and negative ones for sigmoid tasks), so zero steps is the cosine prototype
classifier, then ``steps`` full-batch Adam steps on the task loss. Chen et al. start from a
random head and run 100 epochs of SGD on mini-batches of 4; starting from the prototypes makes
the fit deterministic and needs fewer steps.

``scale``: Chen et al. use 2 for heads of at most 200 classes and 10 above; the default here is
10, which keeps few-shot softmax outputs from being flat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.base import Predictor
from medmeta.learners.checks import check_query_features, check_support_features, feature_dim
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.heads import task_loss
from medmeta.learners.protonet import class_prototypes
from medmeta.tasks import TaskDescription

__all__ = ["BaselinePP", "CosineHead", "cosine_logits", "fit_cosine_head"]


def cosine_logits(features: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(x_i, w_r)``, shape ``(N, R)``."""
    return scale * (F.normalize(features, dim=1) @ F.normalize(weight, dim=1).transpose(0, 1))


class CosineHead(nn.Module):
    """A cosine classifier sized for a task: ``num_outputs`` rows, or ``2 * num_outputs`` (positive
    and negative per label) for sigmoid tasks; ``forward`` gives ``num_outputs`` logit columns."""

    def __init__(self, in_features: int, description: TaskDescription, scale: float = 10.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"CosineHead: scale must be positive, got {scale}")
        self.scale = float(scale)
        self.paired = description.task_target.uses_sigmoid
        self.num_outputs = description.num_outputs
        rows = 2 * self.num_outputs if self.paired else self.num_outputs
        self.weight = nn.Parameter(torch.empty(rows, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation

    def forward(self, features: Tensor) -> Tensor:
        logits = cosine_logits(features, self.weight, self.scale)
        if self.paired:
            k = self.num_outputs
            return logits[:, :k] - logits[:, k:]
        return logits

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, in_features={self.weight.shape[1]}, scale={self.scale}, paired={self.paired}"


def fit_cosine_head(
    features: Tensor,
    labels: Tensor,
    description: TaskDescription,
    scale: float = 10.0,
    steps: int = 100,
    lr: float = 0.01,
    ordinal_loss: str = "ce",
) -> CosineHead:
    """A :class:`CosineHead` started at the normalised prototypes and fitted by ``steps``
    full-batch Adam steps on the task loss of ``features`` (detached); returned in eval mode."""
    features = features.detach()
    head = CosineHead(features.shape[1], description, scale).to(device=features.device, dtype=features.dtype)
    protos = class_prototypes(features, labels, description)
    init = protos.positive if protos.negative is None else torch.cat([protos.positive, protos.negative])
    with torch.no_grad():
        head.weight.copy_(F.normalize(init, dim=1))
    if steps > 0:
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        target = description.task_target
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                task_loss(head(features), labels, target, ordinal_loss=ordinal_loss).backward()
                optimizer.step()
    head.requires_grad_(False)
    return head.eval()


class BaselinePP(FrozenFeatureLearner):
    """Baseline++ at test time: a new cosine classifier per task on frozen backbone features.

    Args:
        backbone: feature extractor with ``num_features``; used in eval mode, never updated.
        scale: the cosine logit scale.
        steps: full-batch Adam steps from the prototype initialisation (0: cosine prototypes).
        lr: Adam learning rate.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.

    Not trainable by ``medmeta-train``; pre-train a backbone with a cosine head with
    ``learner=mm_pt learner.head=cosine``.
    """

    def __init__(
        self, backbone: nn.Module, scale: float = 10.0, steps: int = 100, lr: float = 0.01, ordinal_loss: str = "ce"
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"BaselinePP: scale must be positive, got {scale}")
        if steps < 0 or not lr > 0:
            raise ValueError(f"BaselinePP: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.scale = float(scale)
        self.steps = int(steps)
        self.lr = float(lr)
        self.ordinal_loss = ordinal_loss

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        head = fit_cosine_head(
            support_features, support_labels, description, self.scale, self.steps, self.lr, self.ordinal_loss
        )

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            with torch.no_grad():
                return head(query_features)

        return predict

    def extra_repr(self) -> str:
        return f"scale={self.scale}, steps={self.steps}, lr={self.lr}"
