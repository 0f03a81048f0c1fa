"""R2D2: a ridge-regression head solved in closed form per episode (Bertinetto et al., ICLR 2019,
"Meta-learning with differentiable closed-form solvers"), as the R2D2 head of MetaOptNet
(Lee et al., CVPR 2019).

On support features ``X`` ``(N, D)`` and targets ``Y`` ``(N, R)`` the head is the ridge solution
``W = argmin |X W - Y|^2 + lambda |W|^2 = X^T (X X^T + lambda I)^-1 Y`` (Woodbury form, an ``N x N``
solve, used when ``N <= D``; otherwise ``(X^T X + lambda I)^-1 X^T Y``), and query logits are
``scale * X_q W``. The solve is differentiable, so the backbone, the logit scale (learned, as in
MetaOptNet) and optionally ``lambda`` are meta-trained through it episodically.

Targets: one-hot rows for multi-class and ordinal tasks (MetaOptNet). Binary and multi-label
tasks regress a positive and a negative indicator per label, ``y`` and ``1 - y``, as ProtoNet has
a positive and a negative prototype; the logit is their difference, ``scale * X_q W (2y - 1)``,
i.e. one ridge regression onto ``2y - 1`` per label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.metric import EpisodeHead, MetricLearner
from medmeta.tasks import TaskDescription

__all__ = ["R2D2", "ridge_solution", "ridge_targets"]


def ridge_solution(features: Tensor, targets: Tensor, lam: "float | Tensor") -> Tensor:
    """``W`` ``(D, R)`` minimising ``|X W - Y|^2 + lam |W|^2``, differentiable (dual form when N <= D)."""
    n, d = features.shape
    if n <= d:
        gram = features @ features.transpose(0, 1)
        eye = torch.eye(n, dtype=features.dtype, device=features.device)
        return features.transpose(0, 1) @ torch.linalg.solve(gram + lam * eye, targets)
    eye = torch.eye(d, dtype=features.dtype, device=features.device)
    return torch.linalg.solve(features.transpose(0, 1) @ features + lam * eye, features.transpose(0, 1) @ targets)


def ridge_targets(labels: Tensor, description: TaskDescription, dtype: torch.dtype) -> Tensor:
    """Regression targets ``(N, num_outputs)``: one-hot for softmax tasks, ``2y - 1`` for sigmoid tasks."""
    if description.task_target.uses_sigmoid:
        return 2.0 * labels.to(dtype).reshape(labels.shape[0], -1) - 1.0
    return F.one_hot(labels.long().reshape(-1), description.num_classes).to(dtype)


class R2D2(MetricLearner):
    """Ridge-regression head solved per episode on frozen (test) or trained (meta-training) features.

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        lam: the ridge penalty ``lambda`` (MetaOptNet's R2D2 head: 50).
        learn_lambda: meta-learn ``lambda`` (stored as its log; Bertinetto et al. learn it).
        scale: initial logit scale (MetaOptNet: 1, learned).
        learn_scale: meta-learn the logit scale.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.
    """

    log_lambda: Tensor
    scale: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        lam: float = 50.0,
        learn_lambda: bool = False,
        scale: float = 1.0,
        learn_scale: bool = True,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__(backbone, ordinal_loss)
        if not lam > 0:
            raise ValueError(f"R2D2: lam must be positive, got {lam}")
        ref = next(iter(backbone.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        log_lam = torch.tensor(float(lam), dtype=dtype, device=device).log()
        scale_t = torch.tensor(float(scale), dtype=dtype, device=device)
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lambda", log_lam)
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            self.register_buffer("scale", scale_t)

    @property
    def lam(self) -> Tensor:
        return self.log_lambda.exp()

    def episode_head(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> EpisodeHead:
        targets = ridge_targets(support_labels, description, support_features.dtype)
        weight = ridge_solution(support_features, targets, self.lam.to(support_features.dtype))
        scale = self.scale.to(support_features.dtype)

        def head(query_features: Tensor) -> Tensor:
            return scale * (query_features @ weight)

        return head

    def extra_repr(self) -> str:
        return f"lam={float(self.lam):g}, scale={float(self.scale):g}"
