"""A light U-Net decoder over the backbone's feature pyramid: fine-tuned or meta-trained.

The decoder follows U-Net (Ronneberger et al., MICCAI 2015) as segmentation-models-pytorch
builds it over a timm feature pyramid: from the deepest level up, upsample x2 to the next
level, concatenate it (skip connection) and apply two conv3x3-ReLU; a last block at the
input resolution also sees the image itself. There is no BatchNorm (optional GroupNorm), so
the decoder is a pure function of its parameters (no running statistics): it runs under
``torch.func.functional_call`` unchanged and a prediction never depends on other queries.
A per-task 1x1 head maps the decoder's ``embed_dim`` channels to the task's classes; it is
initialised from class prototypes of the support embeddings (Proto-MAML's head, Triantafillou
et al., "Meta-Dataset", ICLR 2020: ``W_k = 2 p_k``, ``b_k = -|p_k|^2``) or at zero.

* :meth:`UNetSegmenter.adapt` fine-tunes a copy of the decoder (and, with
  ``finetune_backbone=True``, of the backbone) on the support set with Adam or SGD on
  class-balanced cross-entropy plus soft Dice; the learner's own parameters never change.
* :meth:`UNetSegmenter.meta_loss` is MAML on the decoder (Finn et al., ICML 2017), first-order
  by default (FOMAML), or ANIL (Raghu et al., "Rapid Learning or Feature Reuse?", ICLR 2020:
  only the head adapts in the inner loop) with ``meta_algorithm="anil"``; the inner loop is
  medmeta's one MAML inner loop (:func:`medmeta.learners.maml.inner_loop`) on dicts of decoder
  and head parameters. The backbone is frozen during meta-training: only the decoder is
  meta-learned (:func:`medmeta.adapters.segmentation.meta_training.meta_train`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from medmeta.adapters.segmentation.heads.common import (
    SegmentationLearner,
    SegmentationPredictor,
    SupportSet,
    as_segmentation_episode,
    autocast,
    check_query_images,
    check_support_set,
    dense_features,
    eval_mode,
    feature_channels,
    resolve_levels,
    segmentation_loss,
    soft_dice_loss,
)
from medmeta.learners.maml import inner_loop as maml_inner_loop

__all__ = ["UNetDecoder", "UNetSegmenter", "prototype_head", "META_ALGORITHMS", "HEAD_INITS", "NORMS"]

META_ALGORITHMS = ("fomaml", "maml", "anil")
HEAD_INITS = ("prototype", "zero")
Params = dict[str, Tensor]


NORMS = ("none", "group")


def _norm(channels: int, norm: str) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, channels), channels) if norm == "group" else nn.Identity()


class _ConvBlock(nn.Sequential):
    """Two conv3x3-(GroupNorm)-ReLU layers."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "none") -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
            _norm(out_ch, norm),
            nn.ReLU(inplace=False),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
            _norm(out_ch, norm),
            nn.ReLU(inplace=False),
        )


class UNetDecoder(nn.Module):
    """U-Net decoder: ``forward(features, image) -> (B, embed_dim, H, W)``.

    Args:
        feature_channels: channels of the feature maps, shallow to deep.
        decoder_channels: output channels of the skip stages, one per level (deep to shallow),
            or one int for all.
        embed_dim: channels of the full-resolution output.
        image_channels: channels of the image concatenated at full resolution (0: none).
        norm: ``"none"`` (default) or ``"group"`` (GroupNorm normalises each image on its own,
            which makes a tile's prediction depend on how much of it is foreground; without
            normalisation few-shot fine-tuning generalised better to held-out tiles).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        decoder_channels: Union[int, Sequence[int]] = 32,
        embed_dim: int = 16,
        image_channels: int = 1,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        n = len(feature_channels)
        if n == 0:
            raise ValueError("UNetDecoder: needs at least one feature level")
        chans = [int(decoder_channels)] * n if isinstance(decoder_channels, int) else [int(c) for c in decoder_channels]
        if len(chans) != n or min(chans) < 1:
            raise ValueError(f"decoder_channels: expected {n} positive ints (deep to shallow), got {decoder_channels}")
        deep = list(feature_channels)[::-1]
        self.bottleneck = nn.Conv2d(deep[0], chans[0], 1)
        self.stages = nn.ModuleList(
            _ConvBlock(chans[i - 1] + deep[i], chans[i], norm) for i in range(1, n)
        )
        self.image_channels = int(image_channels)
        self.final = _ConvBlock(chans[-1] + self.image_channels, embed_dim, norm)
        self.embed_dim = int(embed_dim)

    def forward(self, features: Sequence[Tensor], image: Tensor) -> Tensor:
        feats = list(features)[::-1]
        x = self.bottleneck(feats[0])
        for stage, skip in zip(self.stages, feats[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = stage(torch.cat([x, skip.to(x.dtype)], dim=1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.image_channels:
            x = torch.cat([x, image.to(x.dtype)], dim=1)
        return self.final(x)


class _DenseFeatures(nn.Module):
    """``forward = backbone.dense_features`` so ``functional_call`` can run a fine-tuned copy."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> list[Tensor]:
        return dense_features(self.backbone, x)


def _dihedral(x: Tensor, t: int) -> Tensor:
    """The ``t``-th (0..7) of the 8 flips / 90-degree rotations of the last two axes (0: identity)."""
    if t >= 4:
        x = x.flip(-1)
    return torch.rot90(x, t % 4, (-2, -1)) if t % 4 else x


def _head_logits(emb: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.einsum("behw,ke->bkhw", emb.float(), weight) + bias.view(1, -1, 1, 1)


def prototype_head(emb: Tensor, support: SupportSet) -> tuple[Tensor, Tensor]:
    """Head ``(W, b)`` of the nearest-prototype classifier of ``emb (S, E, H, W)`` (squared
    Euclidean distance): ``W_k = 2 p_k``, ``b_k = -|p_k|^2``; for multi-label masks the
    difference of the label's foreground and background classifiers."""
    emb = emb.float()
    if support.multilabel:
        t = support.masks
        fg = torch.einsum("sehw,skhw->ke", emb, t) / t.sum(dim=(0, 2, 3))[:, None]
        bg = torch.einsum("sehw,skhw->ke", emb, 1 - t) / (1 - t).sum(dim=(0, 2, 3))[:, None]
        return 2 * (fg - bg), bg.pow(2).sum(1) - fg.pow(2).sum(1)
    t = support.targets()
    p = torch.einsum("sehw,skhw->ke", emb, t) / t.sum(dim=(0, 2, 3))[:, None]
    return 2 * p, -p.pow(2).sum(1)


class UNetSegmenter(SegmentationLearner):
    """U-Net decoder on a backbone's pyramid, fine-tuned per support set or meta-trained.

    Args:
        backbone: a :class:`medmeta.backbones.Backbone`.
        levels: feature levels the decoder uses (all by default).
        decoder_channels, embed_dim, image_skip, norm: the decoder (see :class:`UNetDecoder`);
            ``image_skip`` concatenates the image at full resolution.
        image_channels: channels of the input images (for ``image_skip``).
        head_init: ``"prototype"`` or ``"zero"``.
        finetune_steps, finetune_lr, optimizer: fine-tuning in :meth:`adapt` (``"adam"`` or ``"sgd"``).
        finetune_backbone: also fine-tune a copy of the backbone (BatchNorm statistics stay frozen).
        backbone_lr: its learning rate (default ``finetune_lr / 10``).
        dice_weight: weight of the soft Dice loss added to the cross-entropy.
        class_balanced: inverse-frequency class weights in the cross-entropy.
        augment: fine-tune on a random flip / 90-degree rotation of the support set at each step
            (seeded by ``seed``; with a frozen backbone the 8 variants' features are cached).
        meta_algorithm: ``"fomaml"`` (default), ``"maml"`` (second order) or ``"anil"``.
        inner_steps, inner_lr: the SGD inner loop of :meth:`meta_loss`.
        amp, amp_dtype: mixed precision of backbone and decoder on CUDA (bfloat16 needs no loss scaling).
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Optional[Sequence[int]] = None,
        decoder_channels: Union[int, Sequence[int]] = 32,
        embed_dim: int = 16,
        image_skip: bool = True,
        image_channels: int = 1,
        norm: str = "none",
        head_init: str = "prototype",
        finetune_steps: int = 50,
        finetune_lr: float = 1e-3,
        optimizer: str = "adam",
        finetune_backbone: bool = False,
        backbone_lr: Optional[float] = None,
        dice_weight: float = 1.0,
        class_balanced: bool = True,
        augment: bool = True,
        seed: int = 0,
        meta_algorithm: str = "fomaml",
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(backbone)
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init: expected one of {HEAD_INITS}, got {head_init!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}")
        if meta_algorithm not in META_ALGORITHMS:
            raise ValueError(f"meta_algorithm: expected one of {META_ALGORITHMS}, got {meta_algorithm!r}")
        if finetune_steps < 0 or inner_steps < 0:
            raise ValueError(f"finetune_steps and inner_steps must be >= 0, got {finetune_steps}, {inner_steps}")
        self.levels = resolve_levels(backbone, levels)
        self.image_channels = int(image_channels) if image_skip else 0
        self.decoder = UNetDecoder(
            [feature_channels(backbone)[i] for i in self.levels], decoder_channels, embed_dim, self.image_channels, norm
        )
        self.head_init = head_init
        self.finetune_steps, self.finetune_lr, self.optimizer = int(finetune_steps), float(finetune_lr), optimizer
        self.finetune_backbone = bool(finetune_backbone)
        self.backbone_lr = float(backbone_lr) if backbone_lr is not None else self.finetune_lr / 10
        self.dice_weight, self.class_balanced = float(dice_weight), bool(class_balanced)
        self.augment, self.seed = bool(augment), int(seed)
        self.meta_algorithm = meta_algorithm
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.amp, self.amp_dtype = bool(amp), amp_dtype

    # functional pieces -----------------------------------------------------------------
    def _check_image_channels(self, images: Tensor, where: str) -> None:
        if self.image_channels and images.shape[1] != self.image_channels:
            raise ValueError(
                f"{where}: {images.shape[1]} channels but the decoder's image skip takes "
                f"image_channels={self.image_channels}; build UNetSegmenter(image_channels=...)"
            )

    def _features(self, images: Tensor, backbone_params: Optional[Params] = None) -> list[Tensor]:
        if backbone_params is None:
            return self.features(images, self.levels)
        with eval_mode(self.backbone), autocast(images.device, self.amp, self.amp_dtype):
            maps = functional_call(_DenseFeatures(self.backbone), backbone_params, (images,))
        return [maps[i] for i in self.levels]

    def embed(self, params: Params, feats: Sequence[Tensor], images: Tensor) -> Tensor:
        """Decoder output ``(B, embed_dim, H, W)`` with decoder parameters ``params``."""
        with autocast(images.device, self.amp, self.amp_dtype):
            return functional_call(self.decoder, params, (list(feats), images)).float()

    def _loss(self, logits: Tensor, support: SupportSet) -> Tensor:
        loss = segmentation_loss(logits, support.masks, support.multilabel, self.class_balanced)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, support.masks, support.multilabel)
        return loss

    def _init_head(self, emb: Tensor, support: SupportSet) -> tuple[Tensor, Tensor]:
        if self.head_init == "prototype":
            return prototype_head(emb, support)
        k, e = support.num_outputs, emb.shape[1]
        return emb.new_zeros(k, e), emb.new_zeros(k)

    def decoder_params(self) -> Params:
        return dict(self.decoder.named_parameters())

    # fine-tuning -----------------------------------------------------------------------
    def adapt(self, support_images: Tensor, support_masks: Tensor, num_labels: int) -> SegmentationPredictor:
        """Fine-tune copies of the decoder (and optionally the backbone) on the support set."""
        support = check_support_set(support_images, support_masks, num_labels)
        self._check_image_channels(support.images, "support_images")
        dec = {k: v.detach().clone().requires_grad_(True) for k, v in self.decoder.named_parameters()}
        bb: Optional[Params] = None
        if self.finetune_backbone:
            bb = {f"backbone.{k}": v.detach().clone().requires_grad_(True) for k, v in self.backbone.named_parameters()}
            bb.update({f"backbone.{k}": v for k, v in self.backbone.named_buffers()})
        with torch.enable_grad():
            feats = self._features(support.images, bb)
            with torch.no_grad():
                w0, b0 = self._init_head(self.embed(dec, [f.detach() for f in feats], support.images), support)
            head = {"weight": w0.clone().requires_grad_(True), "bias": b0.clone().requires_grad_(True)}
            groups = [{"params": list(dec.values()) + list(head.values()), "lr": self.finetune_lr}]
            if bb is not None:
                groups.append({"params": [v for v in bb.values() if v.requires_grad], "lr": self.backbone_lr})
            opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)(groups)
            gen = torch.Generator().manual_seed(self.seed)
            cache = {0: feats}
            for step in range(self.finetune_steps):
                t = int(torch.randint(8, (1,), generator=gen)) if self.augment else 0
                images, masks = _dihedral(support.images, t), _dihedral(support.masks, t)
                if bb is not None:
                    f = feats if step == 0 and t == 0 else self._features(images, bb)
                else:
                    if t not in cache:
                        cache[t] = self._features(images)
                    f = cache[t]
                opt.zero_grad(set_to_none=True)
                logits = _head_logits(self.embed(dec, f, images), head["weight"], head["bias"])
                self._loss(logits, SupportSet(images, masks, support.num_labels, support.multilabel)).backward()
                opt.step()
        dec = {k: v.detach() for k, v in dec.items()}
        head = {k: v.detach() for k, v in head.items()}
        bb = None if bb is None else {k: v.detach() for k, v in bb.items()}
        channels = support.images.shape[1]

        def predict(query_images: Tensor) -> Tensor:
            check_query_images(query_images, channels)
            with torch.no_grad():
                feats_q = self._features(query_images, bb)
                return _head_logits(self.embed(dec, feats_q, query_images), head["weight"], head["bias"])

        return predict

    # meta-learning -----------------------------------------------------------------------
    def inner_loop(self, feats: Sequence[Tensor], support: SupportSet, params: Params) -> tuple[Params, Params]:
        """``inner_steps`` SGD steps from ``params`` (decoder) on the support loss.

        Returns the adapted decoder parameters and head. MAML/FOMAML adapt decoder and head,
        ANIL only the head; FOMAML and ANIL treat the inner gradients as constants. The steps
        are :func:`medmeta.learners.maml.inner_loop`'s.
        """
        feats = [f.detach() for f in feats]
        emb = self.embed(params, feats, support.images)
        w, b = self._init_head(emb, support)
        head = {"weight": w, "bias": b}
        if self.meta_algorithm == "anil":

            def head_loss(h: Params) -> Tensor:
                return self._loss(_head_logits(emb, h["weight"], h["bias"]), support)

            (head,) = maml_inner_loop(head_loss, (head,), self.inner_steps, self.inner_lr, first_order=True)
            return params, head

        def full_loss(p: Params, h: Params) -> Tensor:
            return self._loss(_head_logits(self.embed(p, feats, support.images), h["weight"], h["bias"]), support)

        first_order = self.meta_algorithm != "maml"
        params, head = maml_inner_loop(full_loss, (params, head), self.inner_steps, self.inner_lr, first_order)
        return params, head

    def meta_loss(self, episodes: Sequence[Any]) -> Tensor:
        """Mean query loss after the inner loop, differentiable w.r.t. the decoder's parameters."""
        losses = []
        for raw in episodes:
            ep = as_segmentation_episode(raw)
            support = check_support_set(ep.support_images, ep.support_masks, ep.num_labels)
            query = check_support_set(ep.query_images, ep.query_masks, ep.num_labels, where="query")
            if query.multilabel != support.multilabel:
                raise ValueError("episode: support and query masks must both be label masks or both multi-label")
            self._check_image_channels(support.images, "support_images")
            s_feats = self.features(support.images, self.levels)
            q_feats = self.features(query.images, self.levels)
            params, head = self.inner_loop(s_feats, support, self.decoder_params())
            logits = _head_logits(self.embed(params, q_feats, query.images), head["weight"], head["bias"])
            losses.append(self._loss(logits, query))
        if not losses:
            raise ValueError("meta_loss: no episodes")
        return torch.stack(losses).mean()

