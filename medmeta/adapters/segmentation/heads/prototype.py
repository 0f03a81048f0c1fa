"""Prototype segmentation head: masked average pooling and scaled cosine similarity.

Follows PANet (Wang et al., "PANet: Few-Shot Image Semantic Segmentation with Prototype
Alignment", ICCV 2019): support features are averaged under each class's mask into one
prototype per class (background included) and every query pixel gets the logits
``scale * cos(feature, prototype)`` (PANet's alpha = 20). Options:

* ``local_prototypes=True``: SSL-ALPNet's adaptive local prototypes (Ouyang et al.,
  "Self-Supervision with Superpixels: Training Few-shot Medical Image Segmentation without
  Annotation", ECCV 2020): support features and masks are average-pooled on a
  ``grid_size`` x ``grid_size`` grid and a cell becomes an extra prototype of a class when at
  least ``local_threshold`` of it belongs to the class; a class's logit is the
  softmax-weighted sum of its prototypes' similarities, ``sum_j softmax_j(s_j) * s_j``, which
  is ``s`` when the class has only its global prototype.
* ``background="threshold"``: ADNet (Hansen et al., "Anomaly Detection-Inspired Few-Shot
  Medical Image Segmentation Through Self-Supervision With Supervoxels", MedIA 2022) models
  only the foreground; the background logit is the constant ``scale * threshold``, so a pixel
  is foreground when its cosine similarity to the foreground prototype exceeds ``threshold``.
* :meth:`PrototypeSegmenter.meta_loss`: PANet's training loss (query cross-entropy plus, with
  ``align_weight > 0``, the prototype alignment loss that segments the support with
  prototypes taken from the query prediction), differentiable w.r.t. the backbone.

Features of the chosen ``levels`` are resized (bilinear) to the finest chosen level and
concatenated; masks are average-pooled to that grid, giving soft pixel weights. Logits are
computed on the feature grid and upsampled (bilinear) to the query resolution.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.adapters.segmentation.heads.common import (
    SegmentationLearner,
    SegmentationPredictor,
    SupportSet,
    as_segmentation_episode,
    check_query_images,
    check_support_set,
    resolve_levels,
    segmentation_loss,
)

__all__ = [
    "PrototypeSegmenter",
    "masked_average_prototypes",
    "local_prototypes",
    "prototype_scores",
    "concat_levels",
    "BACKGROUND_MODES",
]

BACKGROUND_MODES = ("prototype", "threshold")


def concat_levels(maps: Sequence[Tensor]) -> Tensor:
    """Resize feature maps to the first map's size (bilinear) and concatenate the channels."""
    size = maps[0].shape[-2:]
    return torch.cat(
        [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps],
        dim=1,
    )


def masked_average_prototypes(features: Tensor, weights: Tensor, eps: float = 1e-8) -> Tensor:
    """Masked average pooling: ``features (S, D, h, w)``, ``weights (S, K, h, w)`` -> ``(K, D)``.

    ``p_k = sum_{s,y,x} w_k f / sum_{s,y,x} w_k`` (PANet eq. 1, with soft weights).
    """
    num = torch.einsum("sdhw,skhw->kd", features, weights)
    return num / weights.sum(dim=(0, 2, 3)).clamp_min(eps)[:, None]


def local_prototypes(features: Tensor, weights: Tensor, grid_size: int, threshold: float) -> list[Tensor]:
    """ALPNet's local prototypes: grid cells that are at least ``threshold`` one class.

    Returns one ``(n_k, D)`` tensor per class (``n_k`` may be 0).
    """
    k = max(1, min(grid_size, features.shape[-2], features.shape[-1]))
    pooled_f = F.avg_pool2d(features, k, stride=k)  # (S, D, h', w')
    pooled_w = F.avg_pool2d(weights, k, stride=k)  # (S, K, h', w')
    cells = pooled_f.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    fractions = pooled_w.permute(0, 2, 3, 1).reshape(-1, weights.shape[1])
    return [cells[fractions[:, c] >= threshold] for c in range(weights.shape[1])]


def prototype_scores(features: Tensor, prototypes: Sequence[Tensor], scale: float) -> Tensor:
    """Logits ``(Q, K, h, w)`` of query ``features (Q, D, h, w)`` for ``K`` prototype sets.

    Class ``k`` has prototypes ``(n_k, D)``; with similarities ``s_j = scale * cos(f, p_j)``
    its logit is ``sum_j softmax_j(s_j) s_j`` (ALPNet), i.e. ``s_0`` when ``n_k = 1`` (PANet).
    """
    f = F.normalize(features, dim=1)
    out = []
    for protos in prototypes:
        p = F.normalize(protos, dim=1)
        sims = scale * torch.einsum("qdhw,nd->qnhw", f, p)
        out.append(sims[:, 0] if p.shape[0] == 1 else (sims.softmax(dim=1) * sims).sum(dim=1))
    return torch.stack(out, dim=1)


class PrototypeSegmenter(SegmentationLearner):
    """Few-shot segmentation by prototypes (PANet / SSL-ALPNet / ADNet; see module docstring).

    Args:
        backbone: a :class:`medmeta.backbones.Backbone` (``dense_features``).
        levels: feature levels to use (positions in ``backbone.feature_channels``; all by default).
        scale: the cosine-similarity scale (PANet and ALPNet: 20).
        local_prototypes: add ALPNet's local grid prototypes.
        grid_size: side of a local-prototype cell in feature pixels (ALPNet pools 4 x 4 cells).
        local_threshold: fraction of a cell a class must cover to make it a local prototype.
        background: ``"prototype"`` (PANet/ALPNet) or ``"threshold"`` (ADNet).
        threshold: ADNet's cosine threshold for ``background="threshold"``.
        align_weight: weight of PANet's prototype alignment loss in :meth:`meta_loss`.
        amp: mixed precision for the backbone on CUDA.
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Optional[Sequence[int]] = None,
        scale: float = 20.0,
        local_prototypes: bool = False,
        grid_size: int = 4,
        local_threshold: float = 0.95,
        background: str = "prototype",
        threshold: float = 0.5,
        align_weight: float = 1.0,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(backbone)
        if background not in BACKGROUND_MODES:
            raise ValueError(f"background: expected one of {BACKGROUND_MODES}, got {background!r}")
        if scale <= 0:
            raise ValueError(f"scale: expected > 0, got {scale}")
        if grid_size < 1:
            raise ValueError(f"grid_size: expected >= 1, got {grid_size}")
        if not 0 < local_threshold <= 1:
            raise ValueError(f"local_threshold: expected in (0, 1], got {local_threshold}")
        self.levels = resolve_levels(backbone, levels)
        self.scale = float(scale)
        self.local_prototypes = bool(local_prototypes)
        self.grid_size = int(grid_size)
        self.local_threshold = float(local_threshold)
        self.background = background
        self.threshold = float(threshold)
        self.align_weight = float(align_weight)
        self.amp = bool(amp)
        self.amp_dtype = amp_dtype

    # building blocks -------------------------------------------------------------------
    def feature_map(self, images: Tensor, grad: bool = False) -> Tensor:
        """Concatenated multi-level features ``(B, D, h, w)`` on the finest chosen grid."""
        return concat_levels(self.features(images, self.levels, grad=grad))

    def class_prototypes(self, features: Tensor, targets: Tensor) -> list[Tensor]:
        """Prototype sets of the ``K`` classes in ``targets (S, K, H, W)`` (0/1 or soft)."""
        weights = F.adaptive_avg_pool2d(targets.float(), (features.shape[-2], features.shape[-1]))
        protos = [p[None] for p in masked_average_prototypes(features, weights)]
        if self.local_prototypes:
            local = local_prototypes(features, weights, self.grid_size, self.local_threshold)
            protos = [torch.cat([g, loc], dim=0) for g, loc in zip(protos, local)]
        return protos

    def logits_from_features(self, query: Tensor, support: Tensor, targets: Tensor, multilabel: bool) -> Tensor:
        """Logits on the feature grid for label masks (``K = L + 1`` one-hot targets, background
        first) or multi-label masks (``K = L`` targets; one logit per label)."""
        if multilabel:
            logits = []
            for k in range(targets.shape[1]):
                fg = targets[:, k : k + 1]
                if self.background == "threshold":
                    s = prototype_scores(query, self.class_prototypes(support, fg), self.scale)[:, 0]
                    logits.append(s - self.scale * self.threshold)
                else:
                    s = prototype_scores(query, self.class_prototypes(support, torch.cat([1 - fg, fg], 1)), self.scale)
                    logits.append(s[:, 1] - s[:, 0])
            return torch.stack(logits, dim=1)
        if self.background == "threshold":
            fg = prototype_scores(query, self.class_prototypes(support, targets[:, 1:]), self.scale)
            bg = torch.full_like(fg[:, :1], self.scale * self.threshold)
            return torch.cat([bg, fg], dim=1)
        return prototype_scores(query, self.class_prototypes(support, targets), self.scale)

    # learner API -----------------------------------------------------------------------
    def adapt(self, support_images: Tensor, support_masks: Tensor, num_labels: int) -> SegmentationPredictor:
        """Compute the prototypes once; the predictor scores query pixels against them."""
        support = check_support_set(support_images, support_masks, num_labels)
        with torch.no_grad():
            feats = self.feature_map(support.images)
            targets = support.targets()
        channels = support.images.shape[1]

        def predict(query_images: Tensor) -> Tensor:
            check_query_images(query_images, channels)
            with torch.no_grad():
                q = self.feature_map(query_images)
                logits = self.logits_from_features(q, feats, targets, support.multilabel)
                return F.interpolate(logits, size=query_images.shape[-2:], mode="bilinear", align_corners=False)

        return predict

    def meta_loss(self, episodes: Sequence[Any]) -> Tensor:
        """PANet's training loss, mean over episodes; gradients reach the backbone."""
        losses = []
        for raw in episodes:
            ep = as_segmentation_episode(raw)
            support = check_support_set(ep.support_images, ep.support_masks, ep.num_labels)
            query = check_support_set(ep.query_images, ep.query_masks, ep.num_labels, where="query")
            s_feat = self.feature_map(support.images, grad=True)
            q_feat = self.feature_map(query.images, grad=True)
            logits = self.logits_from_features(q_feat, s_feat, support.targets(), support.multilabel)
            logits = F.interpolate(logits, size=query.images.shape[-2:], mode="bilinear", align_corners=False)
            loss = segmentation_loss(logits, query.masks, support.multilabel)
            if self.align_weight > 0:
                loss = loss + self.align_weight * self._alignment_loss(logits, q_feat, s_feat, support)
            losses.append(loss)
        if not losses:
            raise ValueError("meta_loss: no episodes")
        return torch.stack(losses).mean()

    def _alignment_loss(self, query_logits: Tensor, q_feat: Tensor, s_feat: Tensor, support: SupportSet) -> Tensor:
        """PANet's prototype alignment: prototypes from the (hard) query prediction segment the support."""
        if support.multilabel:
            pred = (query_logits.detach() > 0).float()
        else:
            pred = F.one_hot(query_logits.detach().argmax(1), support.num_outputs).permute(0, 3, 1, 2).float()
        weights = F.adaptive_avg_pool2d(pred, (q_feat.shape[-2], q_feat.shape[-1]))
        present = weights.sum(dim=(0, 2, 3)) > 0
        if support.multilabel:
            present = present & ((1 - weights).sum(dim=(0, 2, 3)) > 0)
        if not bool(present.all()):  # a class the query prediction lacks has no prototype
            return query_logits.new_zeros(())
        logits = self.logits_from_features(s_feat, q_feat, pred, support.multilabel)
        logits = F.interpolate(logits, size=support.images.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(logits, support.masks, support.multilabel)
