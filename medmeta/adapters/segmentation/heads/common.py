"""What every few-shot segmentation head shares: input checks, losses, features, precision.

Mask encodings (the same as :mod:`medmeta.tasks`):

* **label masks**: ``int64`` ``(S, H, W)``, 0 = background and ``1..L`` the labels; a head
  returns softmax logits ``(Q, L + 1, H, W)`` (channel 0 is background).
* **multi-label masks**: float ``(S, L, H, W)`` holding 0/1 (labels may overlap); a head
  returns one sigmoid logit per label, ``(Q, L, H, W)``.

Logits are always at the resolution of the query images. Backbones are used in eval mode
(BatchNorm with running statistics), so a prediction never depends on the other queries and
adapting never changes the backbone's statistics.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.checks import check_images

__all__ = [
    "SegmentationPredictor",
    "SegmentationEpisode",
    "SegmentationLearner",
    "SupportSet",
    "check_support_set",
    "check_query_images",
    "one_hot_masks",
    "segmentation_loss",
    "soft_dice_loss",
    "predict_masks",
    "autocast",
    "eval_mode",
    "resolve_levels",
    "dense_features",
    "feature_channels",
    "as_segmentation_episode",
]

SegmentationPredictor = Callable[[Tensor], Tensor]


@dataclass
class SupportSet:
    """A checked support set: images, masks and what kind of masks they are."""

    images: Tensor
    masks: Tensor
    num_labels: int
    multilabel: bool

    @property
    def num_outputs(self) -> int:
        """Logit channels: ``L + 1`` for label masks, ``L`` for multi-label masks."""
        return self.num_labels if self.multilabel else self.num_labels + 1

    def targets(self) -> Tensor:
        """Per-class 0/1 maps ``(S, num_outputs, H, W)`` (background first for label masks)."""
        if self.multilabel:
            return self.masks.float()
        return one_hot_masks(self.masks, self.num_labels)


def check_support_set(images: Any, masks: Any, num_labels: Any, where: str = "support") -> SupportSet:
    """Check a support set and say exactly what is wrong with it.

    Raises when the images are not ``(S, C, H, W)`` floats, when the masks do not match the
    images in count or size, when a label is outside ``0..num_labels``, when a multi-label mask
    is not 0/1, or when a label (or the background) has no pixel in the whole support set,
    since no head can learn a class it has never seen.
    """
    check_images(images, f"{where}_images")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels: expected a positive int (labels 1..num_labels), got {num_labels!r}")
    if not isinstance(masks, Tensor):
        raise TypeError(f"{where}_masks: expected a torch.Tensor, got {type(masks).__name__}")
    s, _, h, w = images.shape
    if masks.ndim == 3:
        if masks.dtype.is_floating_point or masks.dtype == torch.bool:
            raise ValueError(
                f"{where}_masks: label masks (S, H, W) must be an integer tensor (0 = background, "
                f"1..{num_labels} labels), got {masks.dtype}; pass multi-label masks as float (S, L, H, W)"
            )
        if tuple(masks.shape) != (s, h, w):
            raise ValueError(
                f"{where}_masks: shape {tuple(masks.shape)} does not match {where}_images "
                f"{tuple(images.shape)}; expected ({s}, {h}, {w})"
            )
        lo, hi = int(masks.min()), int(masks.max())
        if lo < 0 or hi > num_labels:
            raise ValueError(
                f"{where}_masks: values must lie in 0..{num_labels} (0 = background, num_labels="
                f"{num_labels}), found {lo}..{hi}"
            )
        counts = torch.bincount(masks.reshape(-1).long(), minlength=num_labels + 1)
        missing = [("background (0)" if k == 0 else f"label {k}") for k in range(num_labels + 1) if counts[k] == 0]
        if missing:
            raise ValueError(
                f"{where}_masks: no pixel of {', '.join(missing)} in the support set; every label "
                f"1..{num_labels} and the background need at least one annotated pixel"
            )
        return SupportSet(images, masks.long(), num_labels, multilabel=False)
    if masks.ndim == 4:
        if not masks.dtype.is_floating_point:
            raise ValueError(f"{where}_masks: multi-label masks (S, L, H, W) must be float 0/1, got {masks.dtype}")
        if tuple(masks.shape) != (s, num_labels, h, w):
            raise ValueError(
                f"{where}_masks: multi-label shape {tuple(masks.shape)} does not match {where}_images "
                f"{tuple(images.shape)} and num_labels={num_labels}; expected ({s}, {num_labels}, {h}, {w})"
            )
        if bool(((masks != 0) & (masks != 1)).any()):
            raise ValueError(f"{where}_masks: multi-label masks must hold only 0 and 1")
        pos = masks.sum(dim=(0, 2, 3))
        neg = (1 - masks).sum(dim=(0, 2, 3))
        missing = [f"foreground of label {k + 1}" for k in range(num_labels) if pos[k] == 0]
        missing += [f"background of label {k + 1}" for k in range(num_labels) if neg[k] == 0]
        if missing:
            raise ValueError(f"{where}_masks: no pixel of {', '.join(missing)} in the support set")
        return SupportSet(images, masks.float(), num_labels, multilabel=True)
    raise ValueError(
        f"{where}_masks: expected label masks (S, H, W) int64 or multi-label masks (S, L, H, W) float, "
        f"got shape {tuple(masks.shape)}"
    )


def check_query_images(images: Any, channels: int) -> None:
    """Query images must be ``(Q, C, H, W)`` floats with the support's channel count."""
    check_images(images, "query_images")
    if images.shape[1] != channels:
        raise ValueError(f"query_images: {images.shape[1]} channels, the support images have {channels}")


def one_hot_masks(masks: Tensor, num_labels: int) -> Tensor:
    """Label masks ``(S, H, W)`` -> float one-hot ``(S, num_labels + 1, H, W)``."""
    return F.one_hot(masks.long(), num_labels + 1).permute(0, 3, 1, 2).float()


def segmentation_loss(logits: Tensor, masks: Tensor, multilabel: bool, class_balanced: bool = True) -> Tensor:
    """Pixel-wise cross-entropy (label masks) or binary cross-entropy (multi-label masks).

    ``class_balanced`` weights every class by the inverse of its pixel frequency in ``masks``
    (normalised to mean 1 over the present classes), so a small organ counts as much as the
    background; for multi-label masks the positives of each label get ``pos_weight = neg/pos``.
    """
    logits = logits.float()
    if multilabel:
        if not class_balanced:
            return F.binary_cross_entropy_with_logits(logits, masks)
        pos = masks.sum(dim=(0, 2, 3)).clamp_min(1.0)
        neg = (1 - masks).sum(dim=(0, 2, 3)).clamp_min(1.0)
        pos_weight = (neg / pos).view(1, -1, 1, 1)
        return F.binary_cross_entropy_with_logits(logits, masks, pos_weight=pos_weight)
    weight = None
    if class_balanced:
        counts = torch.bincount(masks.reshape(-1), minlength=logits.shape[1]).float()
        present = counts > 0
        weight = torch.zeros_like(counts)
        weight[present] = 1.0 / counts[present]
        weight = weight * present.sum() / weight.sum()
    return F.cross_entropy(logits, masks, weight=weight)


def predict_masks(logits: Tensor, multilabel: bool = False) -> Tensor:
    """Logits -> label masks ``(Q, H, W)`` (argmax) or multi-label 0/1 masks (``logit > 0``)."""
    if multilabel:
        return (logits > 0).float()
    return logits.argmax(dim=1)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16) -> ContextManager[Any]:
    """Mixed precision on CUDA when ``enabled``; a no-op on CPU (and when disabled)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def dense_features(backbone: nn.Module, images: Tensor) -> list[Tensor]:
    """``backbone.dense_features(images)``: the feature maps, shallow to deep (a backbone that
    :class:`SegmentationLearner` accepted has the method)."""
    method: Callable[[Tensor], list[Tensor]] = getattr(backbone, "dense_features")
    return method(images)


def feature_channels(backbone: nn.Module) -> list[int]:
    """``backbone.feature_channels``: the channels of every feature level, shallow to deep."""
    return [int(c) for c in getattr(backbone, "feature_channels")]


def resolve_levels(backbone: nn.Module, levels: Optional[Sequence[int]]) -> list[int]:
    """Positions in ``backbone.feature_channels`` to use (all when ``None``); negative ok."""
    n = len(feature_channels(backbone))
    if levels is None:
        return list(range(n))
    out = []
    for lv in levels:
        if not isinstance(lv, int) or not -n <= lv < n:
            raise ValueError(f"levels: {lv!r} is not a feature level of a backbone with {n} levels (0..{n - 1})")
        out.append(lv % n)
    if not out:
        raise ValueError("levels: give at least one feature level")
    return sorted(set(out))


@dataclass
class SegmentationEpisode:
    """A few-shot segmentation episode: support and query images with masks."""

    support_images: Tensor
    support_masks: Tensor
    query_images: Tensor
    query_masks: Tensor
    num_labels: int


def as_segmentation_episode(episode: Any) -> SegmentationEpisode:
    """Accept a :class:`SegmentationEpisode`, a 5-tuple, or an object with the same fields.

    Objects may name the masks ``support_labels`` / ``query_labels`` (as
    :class:`medmeta.tasks.Episode` does); ``num_labels`` is then read from the object or, for
    a task description whose first class is ``"background"``, as ``num_classes - 1``.
    """
    if isinstance(episode, SegmentationEpisode):
        return episode
    if isinstance(episode, (tuple, list)):
        if len(episode) != 5:
            raise ValueError(
                "episode: a tuple must be (support_images, support_masks, query_images, query_masks, num_labels)"
            )
        return SegmentationEpisode(*episode)
    sm = getattr(episode, "support_masks", None)
    sm = getattr(episode, "support_labels", None) if sm is None else sm
    qm = getattr(episode, "query_masks", None)
    qm = getattr(episode, "query_labels", None) if qm is None else qm
    n = getattr(episode, "num_labels", None)
    if n is None and getattr(episode, "description", None) is not None:
        classes = tuple(episode.description.classes)
        n = len(classes) - 1 if classes and classes[0].lower() in ("background", "bg") else len(classes)
    if sm is None or qm is None or n is None:
        raise ValueError(
            f"episode: {type(episode).__name__} lacks support/query masks or num_labels; "
            f"use medmeta.adapters.segmentation.heads.SegmentationEpisode"
        )
    return SegmentationEpisode(episode.support_images, sm, episode.query_images, qm, int(n))


class SegmentationLearner(nn.Module):
    """Base class of the few-shot segmentation heads.

    ``adapt(support_images, support_masks, num_labels) -> predictor`` and
    ``predictor(query_images) -> logits`` at the query resolution (see module docstring).
    """

    #: mixed precision (CUDA only) and its dtype; subclasses take them as arguments
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for attr in ("dense_features", "feature_channels", "feature_reductions"):
            if not hasattr(backbone, attr):
                raise TypeError(
                    f"backbone: {type(backbone).__name__} has no {attr!r}; use "
                    f"medmeta.backbones.create_backbone(name, out_indices=...)"
                )
        self.backbone = backbone

    def adapt(self, support_images: Tensor, support_masks: Tensor, num_labels: int) -> SegmentationPredictor:
        raise NotImplementedError

    def predict(self, episode: Any) -> Tensor:
        """Query logits of an episode (see :func:`as_segmentation_episode`)."""
        ep = as_segmentation_episode(episode)
        return self.adapt(ep.support_images, ep.support_masks, ep.num_labels)(ep.query_images)

    def features(self, images: Tensor, levels: Sequence[int], grad: bool = False) -> list[Tensor]:
        """Backbone feature maps at ``levels`` (float32), backbone in eval mode."""
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx, eval_mode(self.backbone), autocast(images.device, self.amp, self.amp_dtype):
            maps = dense_features(self.backbone, images)
        return [maps[i].float() for i in levels]


def soft_dice_loss(logits: Tensor, masks: Tensor, multilabel: bool, eps: float = 1.0) -> Tensor:
    """``1 - mean soft Dice`` over the foreground classes (Milletari et al., V-Net, 3DV 2016).

    Label masks: softmax probabilities against one-hot targets, background excluded;
    multi-label masks: sigmoid probabilities per label. Sums run over the whole batch.
    """
    logits = logits.float()
    if multilabel:
        probs, targets = logits.sigmoid(), masks.float()
    else:
        probs = logits.softmax(dim=1)[:, 1:]
        targets = one_hot_masks(masks, logits.shape[1] - 1)[:, 1:]
    inter = (probs * targets).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + targets.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()
