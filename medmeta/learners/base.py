"""The one learner API that every protocol, experiment and adapter uses.

A learner adapts to a labelled support set and returns a predictor that maps query images to
logits (inference). How it trains, if at all, it declares in :attr:`Learner.training_kind`:

* ``"episodic"``: :meth:`Learner.meta_loss` on a meta-batch of episodes, and
  :meth:`Learner.meta_backward`, which the training loop calls with its whole per-rank
  meta-batch (ProtoNet, the MAML family);
* ``"pretraining"``: ``loss(batch)`` on mixed-task batches of images (mm-PT);
* ``None``: it adapts at test time only (linear probe, fine-tuning); the training app refuses
  it before any work (:func:`check_trainable`).

Learners whose predictions depend on images only through a frozen backbone set
``frozen_backbone = True`` and implement :meth:`Learner.adapt_features` (see
:class:`~medmeta.learners.frozen.FrozenFeatureLearner`), so protocols can embed every image
once and solve episodes on cached features.

Transductive learners (``transductive = True``) use the unlabelled query set: their predictor
gets the whole query set in one call, and protocols record them in a ``transductive`` column.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, ContextManager, Literal, Optional, Sequence

from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.tasks import Episode, TaskDescription

__all__ = [
    "Learner",
    "Predictor",
    "TrainingKind",
    "EpisodeScope",
    "check_trainable",
    "trainable_learners",
    "with_fixed_options",
]

Predictor = Callable[[Tensor], Tensor]

TrainingKind = Literal["episodic", "pretraining"]
"""How a learner trains: ``"episodic"`` (``meta_loss`` on meta-batches of episodes) or
``"pretraining"`` (``loss`` on mixed-task batches of images); ``None`` means it is not trainable."""

EpisodeScope = Callable[[Episode], ContextManager[Any]]
"""A context to enter around one episode's share of a meta-batch (the training loop seeds the
torch RNG per episode with it, so dropout does not depend on how episodes are split over ranks)."""

_HOW = {
    "pretraining": "it trains through loss(batch) on mixed-task batches (MixedBatchSampler)",
    None: "it adapts at test time only",
}


class Learner(nn.Module):
    """Base class: ``adapt(support) -> predictor``, ``predictor(query) -> logits``."""

    #: True when predictions depend on images only through ``embed`` (features can be cached).
    frozen_backbone: bool = False
    #: How the training app trains this learner; ``None``: it adapts at test time only.
    training_kind: ClassVar[Optional[TrainingKind]] = None
    #: True when predictions use the unlabelled query set (TIM, PT-MAP, ...): the predictor must
    #: get the whole query set in one call, and protocols mark its results as transductive.
    transductive: ClassVar[bool] = False

    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        """Adapt to a support set; return a callable mapping query images to logits."""
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt()")

    def predict(self, episode: Episode) -> Tensor:
        """Query logits for an episode."""
        return self.adapt(episode.support_images, episode.support_labels, episode.description)(
            episode.query_images
        )

    # Episodic training (training_kind == "episodic") ---------------------------------------
    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean query loss over a batch of episodes, differentiable w.r.t. meta-parameters.

        Only episodic learners have one; the others raise :class:`~medmeta.errors.ConfigError`
        saying how they train.
        """
        raise ConfigError(
            f"{type(self).__name__} has no meta-training loss (training_kind={self.training_kind!r}): "
            f"{_HOW.get(self.training_kind, 'it is not trained on episodes')}"
        )

    def meta_backward(
        self, episodes: Sequence[Episode], scale: Optional[float] = None, episode_scope: Optional[EpisodeScope] = None
    ) -> Tensor:
        """Accumulate the meta-gradient of a meta-batch into ``.grad``; return the mean query loss (detached).

        The gradients are those of ``meta_loss(episodes).backward()`` scaled by
        ``scale * len(episodes)`` (``scale`` defaults to ``1 / len(episodes)``; a data-parallel
        loop passes ``1 / global meta-batch size``, so the gradients summed over ranks are the
        gradient of the global mean). This default builds one graph for the whole meta-batch;
        learners override it to free memory task by task (entering ``episode_scope(episode)``
        around each task) or to batch tasks (MAML with ``vmap``, which ignores the scope).
        """
        scale = 1.0 / len(episodes) if scale is None else float(scale)
        loss = self.meta_loss(episodes)
        (loss * (scale * len(episodes))).backward()
        return loss.detach()

    # Feature path for frozen-backbone learners -------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """Backbone features of ``images`` (``(B, D)``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement embed()")

    def adapt_features(
        self, support_features: Tensor, support_labels: Tensor, description: TaskDescription
    ) -> Predictor:
        """Adapt on precomputed support features; the predictor maps query features to logits."""
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt_features()")


def trainable_learners() -> dict[str, TrainingKind]:
    """Registered learner names that the training app can train, with how they train."""
    from medmeta.learners.registry import LEARNERS

    kinds = {name: getattr(LEARNERS.get(name), "training_kind", None) for name in LEARNERS.names()}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def check_trainable(learner: Any, name: Optional[str] = None) -> TrainingKind:
    """How ``learner`` (an instance, a class, or a registered name) trains; a
    :class:`~medmeta.errors.ConfigError` with a one-line fix when it is not trainable.

    ``name`` is the learner's name in the config (default: the registered name or class name).
    Call it before opening any data, so ``medmeta-train learner=linear_probe`` fails at once.
    """
    if isinstance(learner, str):
        from medmeta.learners.registry import LEARNERS

        name = learner if name is None else name
        learner = LEARNERS.get(learner)
    kind: Optional[TrainingKind] = getattr(learner, "training_kind", None)
    if kind is not None:
        return kind
    if name is None:
        name = learner.__name__ if isinstance(learner, type) else type(learner).__name__
    trainable = ", ".join(sorted(trainable_learners()))
    raise ConfigError(
        f"learner={name} is not trainable ({_HOW[None]}): evaluate it with "
        f"medmeta-evaluate +learner@learners.{name}={name}, or train one of {trainable}"
    )


def with_fixed_options(learner: type, kwargs: dict[str, Any], instead: str) -> dict[str, Any]:
    """``kwargs`` with the settings that a variant class fixes (its ``fixed_options``) filled in.

    A variant (FOMAML of MAML, LinearProbeCV of LinearProbe, ...) takes its parent's arguments
    less the ones it fixes; the config schema leaves those out (:func:`medmeta.config.constructor_parameters`).
    Passing a fixed setting with another value is a :class:`~medmeta.errors.ConfigError` that
    names the parent class to use ``instead``.
    """
    fixed: dict[str, Any] = getattr(learner, "fixed_options", {})
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"{learner.__name__} fixes {key}={value!r}; got {key}={kwargs[key]!r} (use {instead})")
    return {**kwargs, **fixed}
