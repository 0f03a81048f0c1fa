"""Learners by name (timm-style registry): ``create_learner("maml", backbone, inner_steps=5)``.

Experiments and configs name learners; :func:`register_learner` adds new ones without touching
this module. The names are the ones the configs use (``conf/learner/<name>.yaml``).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from medmeta.learners.base import Learner
from medmeta.registry import Registry

__all__ = ["LEARNERS", "register_learner", "create_learner", "list_learners", "is_learner"]

#: name -> learner class or factory ``fn(backbone, **kwargs) -> Learner``
LEARNERS: Registry[Callable[..., Learner]] = Registry("learner")

F = TypeVar("F", bound=Callable[..., Learner])


def register_learner(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``fn(backbone, **kwargs) -> Learner`` (or a class) as ``name``."""
    return LEARNERS.register(name)


def list_learners() -> list[str]:
    """Registered learner names, sorted."""
    return LEARNERS.names()


def is_learner(name: str) -> bool:
    """Whether ``name`` is a registered learner."""
    return name in LEARNERS


def create_learner(name: str, backbone: nn.Module, **kwargs: Any) -> Learner:
    """Create the learner registered as ``name`` on ``backbone``; an unknown name lists the known
    ones (:class:`~medmeta.errors.UnknownNameError`), an argument the learner does not take is an
    :class:`~medmeta.errors.ArgumentError` (a ``TypeError``)."""
    learner: Learner = LEARNERS.create(name, backbone, **kwargs)
    return learner


def _register_builtins() -> None:
    from medmeta.learners.baseline_pp import BaselinePP
    from medmeta.learners.bd_cspn import BDCSPN
    from medmeta.learners.feat import FEAT
    from medmeta.learners.finetune import FineTune
    from medmeta.learners.laplacianshot import LaplacianShot
    from medmeta.learners.linear_probe import LinearProbe, LinearProbeCV
    from medmeta.learners.maml import ANIL, FOMAML, MAML, MetaSGD, ProtoMAML
    from medmeta.learners.matchingnet import MatchingNet
    from medmeta.learners.pmf import PMF
    from medmeta.learners.pretrain import MultiTaskPretrainer
    from medmeta.learners.protonet import ProtoNet
    from medmeta.learners.pt_map import PTMAP
    from medmeta.learners.r2d2 import R2D2
    from medmeta.learners.relationnet import RelationNet
    from medmeta.learners.reptile import Reptile
    from medmeta.learners.tim import TIM, AlphaTIM
    from medmeta.learners.transductive_finetune import TransductiveFineTune

    for name, cls in {
        "protonet": ProtoNet,
        "linear_probe": LinearProbe,
        "linear_probe_cv": LinearProbeCV,
        "pmf": PMF,
        "finetune": FineTune,
        "maml": MAML,
        "fomaml": FOMAML,
        "anil": ANIL,
        "metasgd": MetaSGD,
        "protomaml": ProtoMAML,
        "mm_pt": MultiTaskPretrainer,
        "matchingnet": MatchingNet,
        "relationnet": RelationNet,
        "feat": FEAT,
        "baseline_pp": BaselinePP,
        "r2d2": R2D2,
        "reptile": Reptile,
        "tim": TIM,
        "alpha_tim": AlphaTIM,
        "pt_map": PTMAP,
        "laplacianshot": LaplacianShot,
        "bd_cspn": BDCSPN,
        "transductive_finetune": TransductiveFineTune,
    }.items():
        LEARNERS.register(name, cls)


_register_builtins()
