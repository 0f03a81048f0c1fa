"""Linear probe on upsampled multi-scale features, fitted on the support pixels.

Each pixel is described by the backbone features of the chosen levels, bilinearly upsampled
to the image resolution and concatenated (a hypercolumn, Hariharan et al., "Hypercolumns for
Object Segmentation and Fine-grained Localization", CVPR 2015); a linear classifier on these
pixel features is the dense analogue of the linear-probe baseline of few-shot classification.

Fitting samples at most ``max_pixels_per_class`` support pixels per class, reads their
hypercolumns with ``grid_sample`` at the pixel centres (exactly the values of a bilinear
``F.interpolate`` with ``align_corners=False``, without materialising full-resolution maps),
standardises them and runs ``steps`` full-batch Adam steps on a class-balanced
cross-entropy (or, for multi-label masks, a per-label binary cross-entropy) with an L2
penalty. Because bilinear upsampling and a 1x1 linear map commute, prediction applies the
classifier to every level at its own resolution and upsamples the per-level logits, which is
identical to classifying the upsampled hypercolumns and much cheaper.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.adapters.segmentation.heads.common import (
    SegmentationLearner,
    SegmentationPredictor,
    check_query_images,
    check_support_set,
    resolve_levels,
    segmentation_loss,
)

__all__ = ["LinearProbeSegmenter", "sample_support_pixels", "hypercolumns_at"]


def sample_support_pixels(
    masks: Tensor, num_classes: int, max_per_class: int, generator: torch.Generator, multilabel: bool = False
) -> Tensor:
    """Indices ``(N, 3)`` of support pixels ``(s, y, x)``: at most ``max_per_class`` per class.

    Label masks are sampled per class (rare classes keep all their pixels); multi-label masks
    are sampled uniformly, ``max_per_class * (L + 1)`` pixels in all.
    """
    if multilabel:
        s, _, h, w = masks.shape
        total = s * h * w
        n = min(total, max_per_class * (num_classes + 1))
        flat = torch.randperm(total, generator=generator)[:n]
    else:
        s, h, w = masks.shape
        m = masks.reshape(-1).cpu()
        parts = []
        for c in range(num_classes):
            idx = torch.nonzero(m == c).squeeze(1)
            if idx.numel() > max_per_class:
                idx = idx[torch.randperm(idx.numel(), generator=generator)[:max_per_class]]
            parts.append(idx)
        flat = torch.cat(parts)
    return torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1).to(masks.device)


def hypercolumns_at(maps: Sequence[Tensor], pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly upsampled features of ``maps`` at ``pixels (N, 3)`` of a ``size`` image -> ``(N, D)``.

    Equal to ``F.interpolate(m, size, mode="bilinear", align_corners=False)[s, :, y, x]``.
    """
    h, w = size
    gx = (2 * pixels[:, 2].float() + 1) / w - 1
    gy = (2 * pixels[:, 1].float() + 1) / h - 1
    grid = torch.stack([gx, gy], dim=1)
    out = torch.empty(pixels.shape[0], sum(m.shape[1] for m in maps), device=maps[0].device, dtype=maps[0].dtype)
    for s in torch.unique(pixels[:, 0]).tolist():
        sel = pixels[:, 0] == s
        g = grid[sel].view(1, 1, -1, 2).to(maps[0].dtype)
        cols = [
            F.grid_sample(m[s : s + 1], g, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
            for m in maps
        ]
        out[sel] = torch.cat(cols, dim=1)
    return out


class LinearProbeSegmenter(SegmentationLearner):
    """A linear classifier on hypercolumns of a frozen backbone, fitted per support set.

    Args:
        backbone: a :class:`medmeta.backbones.Backbone`.
        levels: feature levels to concatenate (all by default).
        steps: full-batch Adam steps.
        lr: Adam learning rate (features are standardised, so one rate fits most backbones).
        l2: L2 penalty on the weights.
        max_pixels_per_class: support pixels sampled per class for fitting.
        class_balanced: weight classes by inverse pixel frequency.
        seed: seed of the pixel sampling (fits are deterministic).
        amp: mixed precision for the backbone on CUDA.
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Optional[Sequence[int]] = None,
        steps: int = 200,
        lr: float = 0.05,
        l2: float = 1e-3,
        max_pixels_per_class: int = 2000,
        class_balanced: bool = True,
        seed: int = 0,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(backbone)
        if steps < 1 or lr <= 0 or l2 < 0 or max_pixels_per_class < 1:
            raise ValueError(
                f"linear probe: need steps >= 1, lr > 0, l2 >= 0, max_pixels_per_class >= 1; got "
                f"steps={steps}, lr={lr}, l2={l2}, max_pixels_per_class={max_pixels_per_class}"
            )
        self.levels = resolve_levels(backbone, levels)
        self.steps, self.lr, self.l2 = int(steps), float(lr), float(l2)
        self.max_pixels_per_class = int(max_pixels_per_class)
        self.class_balanced = bool(class_balanced)
        self.seed = int(seed)
        self.amp, self.amp_dtype = bool(amp), amp_dtype

    def adapt(self, support_images: Tensor, support_masks: Tensor, num_labels: int) -> SegmentationPredictor:
        support = check_support_set(support_images, support_masks, num_labels)
        k = support.num_outputs
        maps = self.features(support.images, self.levels)
        gen = torch.Generator().manual_seed(self.seed)
        pixels = sample_support_pixels(
            support.masks, k if not support.multilabel else num_labels, self.max_pixels_per_class, gen, support.multilabel
        )
        x = hypercolumns_at(maps, pixels, (support.images.shape[-2], support.images.shape[-1]))
        s, yy, xx = pixels.unbind(1)
        if support.multilabel:
            y = support.masks[s, :, yy, xx]  # (N, L)
        else:
            y = support.masks[s, yy, xx]  # (N,)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        weight = torch.zeros(k, x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(k, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                logits = xs @ weight.T + bias
                loss = segmentation_loss(
                    logits[:, :, None, None], y[:, :, None, None] if support.multilabel else y[:, None, None],
                    support.multilabel, self.class_balanced,
                )
                loss = loss + self.l2 * weight.pow(2).sum()
                loss.backward()
                opt.step()
        # fold the standardisation into the classifier, split per level
        w = (weight / std).detach()
        b = (bias - (weight * mean / std).sum(1)).detach()
        split = [m.shape[1] for m in maps]
        per_level = list(torch.split(w, split, dim=1))
        channels = support.images.shape[1]

        def predict(query_images: Tensor) -> Tensor:
            check_query_images(query_images, channels)
            size = query_images.shape[-2:]
            qmaps = self.features(query_images, self.levels)
            with torch.no_grad():
                out = b.view(1, -1, 1, 1).expand(query_images.shape[0], -1, *size).clone()
                for m, wl in zip(qmaps, per_level):
                    out += F.interpolate(
                        F.conv2d(m, wl[:, :, None, None]), size=size, mode="bilinear", align_corners=False
                    )
            return out

        return predict
