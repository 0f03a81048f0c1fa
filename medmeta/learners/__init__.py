"""Learners: one module per method, one API (``adapt`` -> predictor, ``meta_loss``).

``create_learner(name, backbone, **kwargs)`` builds any of them by name; ``list_learners()``
lists the names.
"""
from medmeta.learners.base import Learner, Predictor
from medmeta.learners.finetune import FineTune, MedIMetaAugment
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.linear_probe import LinearProbe, fit_linear_head
from medmeta.learners.maml import ANIL, FOMAML, MAML, AdaptedTask, MetaSGD, ProtoMAML
from medmeta.learners.pretrain import MixedBatchSampler, MultiTaskPretrainer, TaskBatch
from medmeta.learners.protonet import ProtoNet, Prototypes, class_prototypes, prototype_head, prototype_logits
from medmeta.learners.registry import LEARNERS, create_learner, is_learner, list_learners, register_learner
from medmeta.learners.state import load_learner, save_learner

__all__ = [
    "Learner",
    "Predictor",
    "FrozenFeatureLearner",
    "ProtoNet",
    "Prototypes",
    "class_prototypes",
    "prototype_head",
    "prototype_logits",
    "LinearProbe",
    "fit_linear_head",
    "FineTune",
    "MedIMetaAugment",
    "MAML",
    "FOMAML",
    "ANIL",
    "MetaSGD",
    "ProtoMAML",
    "AdaptedTask",
    "MultiTaskPretrainer",
    "MixedBatchSampler",
    "TaskBatch",
    "LEARNERS",
    "create_learner",
    "list_learners",
    "register_learner",
    "is_learner",
    "save_learner",
    "load_learner",
]
