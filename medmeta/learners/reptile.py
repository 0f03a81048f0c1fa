"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task, starting from the meta-parameters ``theta``, ``inner_steps`` SGD steps on the
task's data give ``phi``; the meta-update moves ``theta`` towards the adapted parameters,
``theta <- theta + epsilon * mean_tasks(phi - theta)``. No derivative of the inner loop is taken.

The inner loop is medmeta's one MAML inner loop (:func:`medmeta.learners.maml.inner_loop`, via
:class:`~medmeta.learners.maml.MAML`), with a new head per task (zero-initialised, or from the
prototypes with ``head_init="proto"``), so tasks of any kind and way mix in a meta-batch; the head
is discarded after each task and only the backbone is meta-learned. A training episode has no
held-out part in Reptile: its support and query images together are the task's data.

How it trains through :class:`~medmeta.training.loop.TrainingLoop`: :meth:`Reptile.meta_backward`
writes the pseudo-gradient ``scale * (theta - phi_task)`` of every task into ``.grad`` (with the
loop's ``scale = 1 / meta_batch_size`` the sum is ``mean(theta - phi)``), and the outer optimiser
applies it: ``trainer.optimizer=sgd trainer.momentum=0 trainer.lr=epsilon`` is the classic Reptile
step (``lr=1`` moves ``theta`` to the mean adapted parameters); Adam on the pseudo-gradient also
works (Nichol et al. discuss both). Gradient clipping (``trainer.grad_clip``) and weight decay
apply to the pseudo-gradient like to any gradient. :meth:`Reptile.meta_loss` is the surrogate
``mean_tasks(|theta - stop_grad(phi)|^2 / 2)``, whose gradient is exactly that pseudo-gradient,
so code that calls ``meta_loss(episodes).backward()`` also does Reptile.

At test time Reptile adapts like MAML (``eval_inner_steps`` SGD steps on the support set with a
new head); BatchNorm follows ``bn_mode`` as in MAML.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.base import EpisodeScope
from medmeta.learners.checks import check_episodes
from medmeta.learners.heads import task_loss
from medmeta.learners.maml import AdaptedTask, MAMLVariant, inner_loop
from medmeta.learners.protonet import class_prototypes, prototype_head
from medmeta.modes import module_mode
from medmeta.tasks import Episode

__all__ = ["Reptile"]


def _task_data(episode: Episode) -> tuple[Tensor, Tensor]:
    """The episode's support and query examples together (Reptile's task data)."""
    if episode.support_images.shape[1:] != episode.query_images.shape[1:]:
        return episode.support_images, episode.support_labels
    return (
        torch.cat([episode.support_images, episode.query_images]),
        torch.cat([episode.support_labels, episode.query_labels]),
    )


class Reptile(MAMLVariant):
    """Reptile: first-order meta-learning by moving towards each task's adapted parameters.

    Takes MAML's arguments (``inner_steps``, ``inner_lr``, ``eval_inner_steps``, ``eval_inner_lr``,
    ``head_init``, ``bn_mode``, ``update_running_stats``, ``ordinal_loss``); ``first_order`` is
    fixed to True and ``head_only``, ``learn_inner_lr`` and ``vmap`` to False.
    """

    fixed_options = {"first_order": True, "head_only": False, "learn_inner_lr": False, "vmap": False}

    def _meta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The backbone parameters Reptile moves (those that require gradients)."""
        return [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _refresh_stats(self, images: Tensor) -> None:
        """One train-mode forward pass, updating BatchNorm running statistics (``update_running_stats``)."""
        if self.update_running_stats and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules()):
            with module_mode(self.backbone, True):
                self.backbone(images)

    def adapted_task(self, episode: Episode) -> AdaptedTask:
        """``phi`` of one training task: ``inner_steps`` SGD steps (rate ``inner_lr``) of the one MAML
        inner loop on the task's data, from the current backbone and a new head; no graph."""
        images, labels = _task_data(episode)
        description = episode.description
        params = {n: p.detach() for n, p in self.backbone.named_parameters()}
        moved = {n: params[n] for n, _ in self._meta_parameters()}
        fixed = {n: t for n, t in params.items() if n not in moved}
        with torch.no_grad():
            if self.head_init == "proto":
                weight, bias = prototype_head(class_prototypes(self.features(params, images), labels, description))
            else:
                ref = images
                weight = torch.zeros(description.num_outputs, self.num_features, dtype=ref.dtype, device=ref.device)
                bias = torch.zeros(description.num_outputs, dtype=ref.dtype, device=ref.device)

            def loss_fn(moved_: dict[str, Tensor], head_: dict[str, Tensor]) -> Tensor:
                logits = F.linear(self.features({**fixed, **moved_}, images), head_["weight"], head_["bias"])
                return task_loss(logits, labels, description.task_target, ordinal_loss=self.ordinal_loss)

            moved, head = inner_loop(loss_fn, ({**moved}, {"weight": weight, "bias": bias}), self.inner_steps, self.inner_lr, True)
        return AdaptedTask(params={**fixed, **moved}, head=head)

    def _displacements(self, adapted: AdaptedTask) -> list[tuple[nn.Parameter, Tensor]]:
        return [(p, p.detach() - adapted.params[n]) for n, p in self._meta_parameters()]

    def _task_loss(self, episode: Episode, adapted: AdaptedTask) -> Tensor:
        images, labels = _task_data(episode)
        with torch.no_grad():
            logits = self.forward_adapted(adapted, images)
            return task_loss(logits, labels, episode.description.task_target, ordinal_loss=self.ordinal_loss)

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Surrogate ``mean_tasks(|theta - stop_grad(phi)|^2 / 2)``: its gradient is ``mean(theta - phi)``."""
        check_episodes(episodes)
        total: Optional[Tensor] = None
        for ep in episodes:
            self._refresh_stats(ep.support_images)
            adapted = self.adapted_task(ep)
            term = sum(
                (0.5 * (p - adapted.params[n]).pow(2).sum() for n, p in self._meta_parameters()),
                torch.zeros((), dtype=ep.support_images.dtype, device=ep.support_images.device),
            )
            total = term if total is None else total + term
        assert total is not None
        return total / len(episodes)

    def meta_backward(
        self, episodes: Sequence[Episode], scale: Optional[float] = None, episode_scope: Optional[EpisodeScope] = None
    ) -> Tensor:
        """Add ``scale * (theta - phi_task)`` of every task to ``.grad``; return the mean task loss
        at the adapted parameters (for logging; detached). Each task runs in ``episode_scope``."""
        check_episodes(episodes)
        scale = 1.0 / len(episodes) if scale is None else float(scale)
        total: Optional[Tensor] = None
        for ep in episodes:
            with episode_scope(ep) if episode_scope is not None else nullcontext():
                self._refresh_stats(ep.support_images)
                adapted = self.adapted_task(ep)
                for p, delta in self._displacements(adapted):
                    step = delta * scale
                    if p.grad is None:
                        p.grad = step.clone()
                    else:
                        p.grad.add_(step)
                loss = self._task_loss(ep, adapted)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(episodes)
