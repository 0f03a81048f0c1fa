"""P>M>F (Hu et al., CVPR 2022, "Pushing the Limits of Simple Pipelines for Few-Shot Learning").

The recipe is pre-training (P: e.g. ImageNet weights or mm-PT), episodic meta-training of a
ProtoNet (M: :meth:`ProtoNet.meta_loss`, inherited, so ``medmeta-train learner=pmf`` trains
exactly a ProtoNet) and test-time fine-tuning (F), which this learner adds at ``adapt``:

1. **Learning rate from the support set alone.** A few pseudo-episodes are split off the
   support set (per class ``pseudo_shots`` examples as pseudo-support, the rest as
   pseudo-query; for multi-label tasks a greedy pseudo-support covering a positive and a
   negative of every label). For every learning rate of ``lrs`` a copy of the backbone is
   fine-tuned on the pseudo-support and scored on the pseudo-query (accuracy, ties broken by the
   lower loss, then by the smaller learning rate); learning rate 0 (plain ProtoNet) is always a
   candidate. The query set of the episode is never seen, its labels never exist here.
2. **Fine-tune on the whole support set** with the chosen rate (Adam, ``steps`` steps, as the
   reference implementation): each step the prototypes are computed from the unaugmented
   support images with the current backbone and the task loss is taken on augmented support
   images (colour jitter and translation by default, as the paper's DiffAugment).
3. **Predict with prototypes** of the fine-tuned backbone.

Every task kind works as in :class:`~medmeta.learners.protonet.ProtoNet` (positive and
negative prototypes per label for binary and multi-label tasks; cross-entropy for multi-class
and ordinal tasks). The support set is put in a canonical order first
(:func:`~medmeta.learners.linear_probe.canonical_order`), so the result does not depend on the
order of the support examples. Randomness (splits, augmentation) comes from the global torch
generator, which the protocols seed per episode. When no pseudo-query can be formed (a single
example per class) no learning rate can be validated and the rate is 0, as in the reference.

Cost: ``pseudo_episodes x len(lrs) x select_steps + steps`` backbone forward/backward passes
per episode; it fine-tunes the backbone, so protocols cannot cache its features.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners.base import Predictor
from medmeta.learners.checks import check_query, check_support
from medmeta.learners.finetune import MedIMetaAugment
from medmeta.learners.heads import task_loss, task_predictions
from medmeta.learners.linear_probe import canonical_order
from medmeta.learners.protonet import ProtoNet, class_prototypes, prototype_logits
from medmeta.modes import module_mode
from medmeta.tasks import TaskDescription

__all__ = ["PMF", "PMFAugment", "LearningRateSelection", "pseudo_episode_split", "DEFAULT_LRS"]

DEFAULT_LRS = (1e-2, 1e-3, 1e-4)
"""The learning rates tried besides 0 (the reference implementation's list)."""

AUGMENTS = (None, "pmf", "medimeta")


class PMFAugment(nn.Module):
    """P>M>F's support augmentation (DiffAugment "color" + "translation", Zhao et al. 2020).

    Per image, with probability ``p`` each: colour (brightness offset in [-0.5, 0.5],
    saturation factor in [0, 2], contrast factor in [0.5, 1.5]) and a translation by up to
    ``ratio / 2`` of the side, filled with zeros (the mean colour of normalised images).
    Uses the global torch generator, and draws the same numbers whatever is applied.
    """

    def __init__(self, p: float = 0.9, ratio: float = 0.125) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0 or ratio < 0:
            raise ConfigError(f"PMFAugment: need 0 <= p <= 1 and ratio >= 0, got p={p}, ratio={ratio}")
        self.p = float(p)
        self.ratio = float(ratio)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        u = torch.rand(b, 4).to(images.device, images.dtype)
        do_color = torch.rand(b) < self.p
        do_shift = torch.rand(b) < self.p
        sy = int(h * self.ratio / 2 + 0.5)
        sx = int(w * self.ratio / 2 + 0.5)
        shifts = torch.stack([torch.randint(-sy, sy + 1, (b,)), torch.randint(-sx, sx + 1, (b,))], dim=1)
        x = images + (u[:, 0, None, None, None] - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2.0 * u[:, 1, None, None, None]) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (u[:, 2, None, None, None] + 0.5) + mean
        out = torch.where(do_color.to(images.device)[:, None, None, None], x, images)
        rows = []
        for i in range(b):
            img = out[i]
            dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
            if bool(do_shift[i]) and (dy or dx):
                padded = nn.functional.pad(img, (sx, sx, sy, sy))
                img = padded[:, sy - dy : sy - dy + h, sx - dx : sx - dx + w]
            rows.append(img)
        return torch.stack(rows)


def _make_augment(augment: Union[None, str, Callable[[Tensor], Tensor]], p: float) -> Optional[Callable[[Tensor], Tensor]]:
    if augment is None or callable(augment):
        return augment
    if augment == "pmf":
        return PMFAugment(p=p)
    if augment == "medimeta":
        return MedIMetaAugment()
    raise ConfigError(f"PMF: augment must be one of {AUGMENTS} or a callable on image batches, got {augment!r}")


def pseudo_episode_split(labels: Tensor, description: TaskDescription, pseudo_shots: int = 1) -> Optional[tuple[Tensor, Tensor]]:
    """Split a support set into pseudo-support and pseudo-query index sets (random, global RNG).

    Multi-class, ordinal and binary tasks: ``min(pseudo_shots, count)`` random examples of each
    class form the pseudo-support, the rest the pseudo-query. Multi-label tasks: examples in
    random order join the pseudo-support while they add a positive or a negative of some label
    that has fewer than ``pseudo_shots`` of them there (every label's positives and negatives
    are then covered), the rest form the pseudo-query. ``None`` when the pseudo-query is empty.
    """
    n = len(labels)
    perm = torch.randperm(n)
    chosen = torch.zeros(n, dtype=torch.bool)
    lab = labels.detach().to("cpu")
    if description.task_target.uses_sigmoid:
        y = lab.reshape(n, -1) > 0.5
        if y.shape[1] == 1:  # binary: two classes
            cls = y[:, 0].long()
            for c in (0, 1):
                members = perm[cls[perm] == c]
                chosen[members[:pseudo_shots]] = True
        else:
            pos = torch.zeros(y.shape[1], dtype=torch.long)
            neg = torch.zeros(y.shape[1], dtype=torch.long)
            for i in perm.tolist():
                row = y[i]
                if bool(((pos < pseudo_shots) & row).any() or ((neg < pseudo_shots) & ~row).any()):
                    chosen[i] = True
                    pos += row.long()
                    neg += (~row).long()
    else:
        cls = lab.reshape(-1).long()
        for c in torch.unique(cls).tolist():
            members = perm[cls[perm] == c]
            chosen[members[:pseudo_shots]] = True
    if bool(chosen.all()):
        return None
    return torch.nonzero(chosen).reshape(-1), torch.nonzero(~chosen).reshape(-1)


@dataclass(frozen=True)
class LearningRateSelection:
    """How :class:`PMF` chose its fine-tuning learning rate on one support set.

    Attributes:
        lr: the chosen learning rate (0: no fine-tuning).
        scores: per candidate, ``(pseudo-query accuracy, pseudo-query loss)`` averaged over the
            pseudo-episodes (empty when no pseudo-episode could be formed).
        pseudo_episodes: how many pseudo-episodes were used.
    """

    lr: float
    scores: dict[float, tuple[float, float]] = field(default_factory=dict)
    pseudo_episodes: int = 0


def _accuracy(logits: Tensor, labels: Tensor, description: TaskDescription) -> float:
    pred = task_predictions(logits, description.task_target)
    return float((pred == labels.to(pred.dtype)).float().mean())


class PMF(ProtoNet):
    """ProtoNet with P>M>F's test-time fine-tuning (learning rate chosen on the support set).

    Args:
        backbone: feature extractor with ``num_features``.
        distance, normalize, temperature, learn_temperature, ordinal_loss: as :class:`ProtoNet`
            (the default distance is cosine, as P>M>F's classifier; ``temperature=None`` is
            then 0.1, i.e. P>M>F's scale of 10).
        steps: fine-tuning steps on the whole support set (reference: 50).
        lrs: learning rates tried besides 0 (``None``: :data:`DEFAULT_LRS`); Adam, no weight decay.
        select_steps: fine-tuning steps per candidate on a pseudo-episode (``None``: ``steps``).
        pseudo_episodes: pseudo-episodes per support set; their scores are averaged.
        pseudo_shots: pseudo-support examples per class (reference: 1).
        augment: ``"pmf"`` (:class:`PMFAugment`), ``"medimeta"``, ``None`` or a callable.
        aug_prob: probability of each augmentation of ``"pmf"`` (reference: 0.9).
        train_bn: fine-tune with BatchNorm in train mode (batch statistics); default ``False``
            keeps the running statistics, so tiny support batches cannot corrupt them.

    :attr:`last_selection` holds the latest episode's :class:`LearningRateSelection`.
    """

    frozen_backbone = False

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "cosine",
        normalize: Optional[str] = None,
        temperature: Optional[float] = None,
        learn_temperature: bool = False,
        ordinal_loss: str = "ce",
        steps: int = 50,
        lrs: Optional[Sequence[float]] = None,
        select_steps: Optional[int] = None,
        pseudo_episodes: int = 2,
        pseudo_shots: int = 1,
        augment: Union[None, str, Callable[[Tensor], Tensor]] = "pmf",
        aug_prob: float = 0.9,
        train_bn: bool = False,
    ) -> None:
        super().__init__(backbone, distance, normalize, temperature, learn_temperature, ordinal_loss)
        grid = DEFAULT_LRS if lrs is None else tuple(float(v) for v in lrs)
        if not all(math.isfinite(v) and v >= 0 for v in grid):
            raise ConfigError(f"PMF: lrs must be finite values >= 0, got {lrs}")
        if int(steps) < 0 or (select_steps is not None and int(select_steps) < 0):
            raise ConfigError(f"PMF: steps and select_steps must be >= 0, got {steps}, {select_steps}")
        if int(pseudo_episodes) < 0 or int(pseudo_shots) < 1:
            raise ConfigError(f"PMF: need pseudo_episodes >= 0 and pseudo_shots >= 1, got {pseudo_episodes}, {pseudo_shots}")
        self.steps = int(steps)
        self.lrs = tuple(sorted({0.0, *grid}))
        self.select_steps = self.steps if select_steps is None else int(select_steps)
        self.pseudo_episodes = int(pseudo_episodes)
        self.pseudo_shots = int(pseudo_shots)
        self.augment = _make_augment(augment, aug_prob)
        self.train_bn = bool(train_bn)
        self.last_selection: Optional[LearningRateSelection] = None

    # -- fine-tuning -----------------------------------------------------------------------
    def fine_tune(self, images: Tensor, labels: Tensor, description: TaskDescription, lr: float, steps: int) -> nn.Module:
        """A copy of the backbone fine-tuned on ``(images, labels)`` (eval mode, no gradients);
        the backbone itself when ``lr == 0`` or ``steps == 0``."""
        if lr == 0 or steps == 0:
            return self.backbone
        model = copy.deepcopy(self.backbone)
        model.train(self.train_bn)
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        temperature = self.temperature.detach().to(images.dtype)
        n = len(images)
        with torch.enable_grad():
            for _ in range(steps):
                augmented = self.augment(images) if self.augment is not None else images
                feats = model(torch.cat([images, augmented]))
                norm = self._normalizer(feats[:n])
                protos = class_prototypes(norm(feats[:n]), labels, description)
                logits = prototype_logits(norm(feats[n:]), protos, self.distance, temperature)
                loss = task_loss(logits, labels, description.task_target, ordinal_loss=self.ordinal_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        model.requires_grad_(False)
        return model

    def _logits(self, model: nn.Module, support: Tensor, labels: Tensor, query: Tensor, description: TaskDescription) -> Tensor:
        """Prototype logits of ``query`` from ``model`` (in eval mode, no gradients)."""
        with module_mode(model, False), torch.no_grad():
            return self._episode_logits(model(support), labels, model(query), description)

    def choose_lr(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> LearningRateSelection:
        """Choose the fine-tuning learning rate on pseudo-episodes of the support set (see module doc)."""
        splits = []
        for _ in range(self.pseudo_episodes):
            split = pseudo_episode_split(support_labels, description, self.pseudo_shots)
            if split is not None:
                splits.append(split)
        if not splits or self.lrs == (0.0,):
            return LearningRateSelection(0.0, {}, len(splits))
        totals = {lr: [0.0, 0.0] for lr in self.lrs}
        for ps_idx, pq_idx in splits:
            ps_idx, pq_idx = ps_idx.to(support_images.device), pq_idx.to(support_images.device)
            ps_x, ps_y = support_images[ps_idx], support_labels[ps_idx]
            pq_x, pq_y = support_images[pq_idx], support_labels[pq_idx]
            for lr in self.lrs:
                model = self.fine_tune(ps_x, ps_y, description, lr, self.select_steps)
                logits = self._logits(model, ps_x, ps_y, pq_x, description)
                totals[lr][0] += _accuracy(logits, pq_y, description)
                totals[lr][1] += float(task_loss(logits, pq_y, description.task_target, ordinal_loss=self.ordinal_loss))
        scores = {lr: (acc / len(splits), loss / len(splits)) for lr, (acc, loss) in totals.items()}
        best = min(self.lrs, key=lambda lr: (-scores[lr][0], scores[lr][1], lr))
        return LearningRateSelection(best, scores, len(splits))

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support(support_images, support_labels, description)
        order = canonical_order(support_images, support_labels).to(support_images.device)
        support_images, support_labels = support_images[order], support_labels[order]
        with module_mode(self.backbone, False):
            selection = self.choose_lr(support_images, support_labels, description)
            self.last_selection = selection
            model = self.fine_tune(support_images, support_labels, description, selection.lr, self.steps)
            with torch.no_grad():
                support_f = model(support_images)
        norm = self._normalizer(support_f)
        protos = class_prototypes(norm(support_f), support_labels, description)
        temperature = self.temperature.detach().to(support_f.dtype)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            with module_mode(model, False), torch.no_grad():
                return prototype_logits(norm(model(query_images)), protos, self.distance, temperature)

        return predict

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Not available: P>M>F fine-tunes the backbone, so it needs images (use :meth:`adapt`)."""
        raise NotImplementedError(
            "PMF fine-tunes its backbone on the support images, so it cannot adapt on cached features; "
            "call adapt() with images (protocols do so, since frozen_backbone is False)"
        )
