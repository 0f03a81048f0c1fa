"""Learners by name (timm-style registry): ``create_learner("maml", backbone, inner_steps=5)``.

Experiments and configs name learners; :func:`register_learner` adds new ones without touching
this module.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from medmeta.learners.base import Learner

__all__ = ["register_learner", "create_learner", "list_learners", "is_learner"]

_REGISTRY: dict[str, Callable[..., Learner]] = {}

F = TypeVar("F", bound=Callable[..., Learner])


def register_learner(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``fn(backbone, **kwargs) -> Learner`` (or a class) as ``name``."""

    def wrap(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"register_learner: {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_learners() -> list[str]:
    """Registered learner names, sorted."""
    return sorted(_REGISTRY)


def is_learner(name: str) -> bool:
    return name in _REGISTRY


def create_learner(name: str, backbone: nn.Module, **kwargs: Any) -> Learner:
    """Create the learner registered as ``name`` on ``backbone``; unknown names list the known ones."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"create_learner: unknown learner {name!r}; known learners are {list_learners()}")
    try:
        return _REGISTRY[key](backbone, **kwargs)
    except TypeError as err:
        raise TypeError(f"create_learner({name!r}): {err}") from err


def _register_builtins() -> None:
    from medmeta.learners.finetune import FineTune
    from medmeta.learners.linear_probe import LinearProbe
    from medmeta.learners.maml import ANIL, FOMAML, MAML, MetaSGD, ProtoMAML
    from medmeta.learners.pretrain import MultiTaskPretrainer
    from medmeta.learners.protonet import ProtoNet

    for name, cls in {
        "protonet": ProtoNet,
        "linear_probe": LinearProbe,
        "finetune": FineTune,
        "maml": MAML,
        "fomaml": FOMAML,
        "anil": ANIL,
        "metasgd": MetaSGD,
        "protomaml": ProtoMAML,
        "mmpt": MultiTaskPretrainer,
    }.items():
        register_learner(name)(cls)


_register_builtins()
