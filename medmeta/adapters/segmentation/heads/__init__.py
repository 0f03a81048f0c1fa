"""Few-shot segmentation heads on dense backbone features, behind one learner API.

``adapt(support_images (S, C, H, W), support_masks, num_labels) -> predictor`` and
``predictor(query_images (Q, C, H, W)) -> logits`` at the query resolution: ``(Q, L + 1, H, W)``
softmax logits for label masks ``(S, H, W)`` int64 (0 = background), ``(Q, L, H, W)`` sigmoid
logits for multi-label masks ``(S, L, H, W)`` float. Build one by name::

    from medmeta.backbones import create_backbone
    from medmeta.adapters.segmentation.heads import create_segmenter

    seg = create_segmenter("prototype", create_backbone("resnet18", out_indices=(1, 2)))
    logits = seg.adapt(support_images, support_masks, num_labels=1)(query_images)

Heads: ``"prototype"`` (PANet / SSL-ALPNet / ADNet), ``"linear"`` (hypercolumn linear probe),
``"unet"`` (U-Net decoder, fine-tuned or meta-trained with FOMAML / ANIL).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from medmeta.adapters.segmentation.heads.common import (
    SegmentationEpisode,
    SegmentationLearner,
    SegmentationPredictor,
    SupportSet,
    as_segmentation_episode,
    check_support_set,
    one_hot_masks,
    predict_masks,
    segmentation_loss,
    soft_dice_loss,
)
from medmeta.adapters.segmentation.heads.linear import LinearProbeSegmenter
from medmeta.adapters.segmentation.heads.prototype import PrototypeSegmenter
from medmeta.adapters.segmentation.heads.unet import UNetDecoder, UNetSegmenter
from medmeta.adapters.segmentation.meta_training import meta_train
from medmeta.registry import Registry

__all__ = [
    "SegmentationEpisode",
    "SegmentationLearner",
    "SegmentationPredictor",
    "SupportSet",
    "PrototypeSegmenter",
    "LinearProbeSegmenter",
    "UNetDecoder",
    "UNetSegmenter",
    "SEGMENTERS",
    "create_segmenter",
    "register_segmenter",
    "list_segmenters",
    "meta_train",
    "as_segmentation_episode",
    "check_support_set",
    "one_hot_masks",
    "predict_masks",
    "segmentation_loss",
    "soft_dice_loss",
]

#: name -> segmentation head class or factory ``fn(backbone, **kwargs)``
SEGMENTERS: Registry[Callable[..., SegmentationLearner]] = Registry("segmenter")
SEGMENTERS.register("prototype", PrototypeSegmenter)
SEGMENTERS.register("linear", LinearProbeSegmenter)
SEGMENTERS.register("unet", UNetSegmenter)


def register_segmenter(name: str, factory: Callable[..., SegmentationLearner]) -> None:
    """Register ``factory(backbone, **kwargs)`` under ``name`` (an existing name is an error)."""
    SEGMENTERS.register(name, factory)


def list_segmenters() -> list[str]:
    """Registered segmentation head names, sorted."""
    return SEGMENTERS.names()


def create_segmenter(name: str, backbone: nn.Module, **kwargs: Any) -> SegmentationLearner:
    """Build the segmentation head ``name`` on ``backbone``; ``kwargs`` go to its constructor. An
    unknown name lists the known ones (:class:`~medmeta.errors.UnknownNameError`)."""
    segmenter: SegmentationLearner = SEGMENTERS.create(name, backbone, **kwargs)
    return segmenter
