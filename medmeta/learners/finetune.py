"""Full fine-tuning per task: the MedIMeta few-shot test protocol (Woerner et al. 2024).

For every episode a *copy* of the backbone gets a new task head (one output for binary tasks,
one per class otherwise) and all parameters are trained on the support set: Adam, 50 steps,
learning rate 1e-3 by default (the fine-tuning baseline of Chen et al. 2019, with MedIMeta's
settings). The learner's own backbone never changes, so episodes are independent.
During fine-tuning the copy is in train mode (BatchNorm batch statistics, running statistics
updated on the copy); queries are predicted in eval mode.

:class:`MedIMetaAugment` is the paper's training augmentation (flips with probability 0.25
each, rotation up to 10 degrees, a random crop of 200/224 of the side resized back with
probability 0.25), applied per image.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from medmeta.learners.base import Learner, Predictor
from medmeta.learners.checks import check_query, check_support, feature_dim
from medmeta.learners.heads import make_head, task_loss
from medmeta.tasks import TaskDescription

__all__ = ["FineTune", "MedIMetaAugment", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "adamw", "sgd")
HEAD_INITS = ("default", "zero")


class MedIMetaAugment(nn.Module):
    """Per-image random flips, small rotation and crop-resize of a ``(B, C, H, W)`` batch.

    Uses the global torch random generator, so ``torch.manual_seed`` makes it reproducible.
    """

    def __init__(
        self,
        p_hflip: float = 0.25,
        p_vflip: float = 0.25,
        max_rotation: float = 10.0,
        p_rotate: float = 1.0,
        crop_fraction: float = 200 / 224,
        p_crop: float = 0.25,
    ) -> None:
        super().__init__()
        self.p_hflip, self.p_vflip = p_hflip, p_vflip
        self.max_rotation, self.p_rotate = max_rotation, p_rotate
        self.crop_fraction, self.p_crop = crop_fraction, p_crop

    def _one(self, img: Tensor) -> Tensor:
        import torchvision.transforms.v2.functional as TF

        r = torch.rand(6)
        if r[0] < self.p_hflip:
            img = img.flip(-1)
        if r[1] < self.p_vflip:
            img = img.flip(-2)
        if self.max_rotation > 0 and r[2] < self.p_rotate:
            angle = float((r[3] * 2 - 1) * self.max_rotation)
            img = TF.rotate(img, angle, interpolation=TF.InterpolationMode.BILINEAR)
        if r[4] < self.p_crop:
            h, w = img.shape[-2:]
            ch, cw = max(1, round(h * self.crop_fraction)), max(1, round(w * self.crop_fraction))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            left = int(torch.randint(0, w - cw + 1, (1,)))
            img = TF.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)
        return img

    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([self._one(img) for img in images])


def _make_augment(augment: Union[None, str, Callable[[Tensor], Tensor]]) -> Optional[Callable[[Tensor], Tensor]]:
    if augment is None or callable(augment):
        return augment
    if augment == "medimeta":
        return MedIMetaAugment()
    raise ValueError(f"FineTune: augment must be None, 'medimeta' or a callable on image batches, got {augment!r}")


class FineTune(Learner):
    """Fine-tune a copy of the backbone with a new head on each support set.

    Args:
        backbone: feature extractor with ``num_features``.
        steps: optimisation steps per episode (MedIMeta: 50).
        lr: learning rate of the head (and of the backbone unless ``backbone_lr`` is given).
        optimizer: ``"adam"`` (MedIMeta), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        batch_size: support images per step; ``None`` uses the whole support set each step,
            otherwise minibatches are drawn from a fresh permutation each pass.
        augment: ``None``, ``"medimeta"`` (:class:`MedIMetaAugment`) or a callable on batches.
        weight_decay: optimiser weight decay.
        backbone_lr: learning rate of the backbone (``0`` freezes it: a head-only fine-tune).
            Only backbone parameters that require gradients train, so partial fine-tuning is
            ``create_backbone(..., trainable_blocks=k)`` (Hydra: ``backbone.trainable_blocks=k``),
            which freezes all but the last ``k`` blocks (docs/backbones.md).
        head_init: ``"default"`` (PyTorch's ``nn.Linear`` init) or ``"zero"``.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.

    Randomness (head init, minibatches, augmentation) comes from the global torch generator.
    """

    def __init__(
        self,
        backbone: nn.Module,
        steps: int = 50,
        lr: float = 1e-3,
        optimizer: str = "adam",
        batch_size: Optional[int] = None,
        augment: Union[None, str, Callable[[Tensor], Tensor]] = None,
        weight_decay: float = 0.0,
        backbone_lr: Optional[float] = None,
        head_init: str = "default",
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FineTune: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"FineTune: head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if steps < 0 or lr <= 0:
            raise ValueError(f"FineTune: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"FineTune: batch_size must be None or >= 1, got {batch_size}")
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.steps = int(steps)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.augment = _make_augment(augment)
        self.weight_decay = float(weight_decay)
        self.backbone_lr = self.lr if backbone_lr is None else float(backbone_lr)
        self.head_init = head_init
        self.ordinal_loss = ordinal_loss

    def _optimizer(self, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
        groups = [{"params": list(head.parameters()), "lr": self.lr}]
        if self.backbone_lr > 0:
            groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": self.backbone_lr})
        else:
            model.requires_grad_(False)
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)

    def _batches(self, n: int, device: torch.device):
        """Index batches for ``steps`` steps: full batch, or minibatches over permutations."""
        if self.batch_size is None or self.batch_size >= n:
            full = torch.arange(n, device=device)
            for _ in range(self.steps):
                yield full
            return
        per_epoch = math.ceil(n / self.batch_size)
        done = 0
        while done < self.steps:
            perm = torch.randperm(n).to(device)
            for i in range(per_epoch):
                if done >= self.steps:
                    return
                yield perm[i * self.batch_size : (i + 1) * self.batch_size]
                done += 1

    def fine_tune(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> nn.Sequential:
        """A fine-tuned copy ``Sequential(backbone, head)`` in eval mode (for inspection / reuse)."""
        check_support(support_images, support_labels, description)
        model = copy.deepcopy(self.backbone)
        ref = next(model.parameters(), None)
        head = make_head(self.num_features, description)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        if self.head_init == "zero":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        net = nn.Sequential(model, head)
        opt = self._optimizer(model, head)
        target = description.task_target
        net.train()
        with torch.enable_grad():
            for idx in self._batches(len(support_images), support_images.device):
                x = support_images[idx]
                if self.augment is not None:
                    x = self.augment(x)
                loss = task_loss(net(x), support_labels[idx], target, ordinal_loss=self.ordinal_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        net.requires_grad_(False)
        return net

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        net = self.fine_tune(support_images, support_labels, description)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            with torch.no_grad():
                return net(query_images)

        return predict
