"""Learners: one module per method, one API (``adapt`` -> predictor, ``meta_loss``).

``create_learner(name, backbone, **kwargs)`` builds any of them by name; ``list_learners()``
lists the names.
"""
from medmeta.learners.base import Learner, Predictor
from medmeta.learners.baseline_pp import BaselinePP, CosineHead
from medmeta.learners.bd_cspn import BDCSPN
from medmeta.learners.feat import FEAT
from medmeta.learners.finetune import FineTune, MedIMetaAugment
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.learners.laplacianshot import LaplacianShot
from medmeta.learners.linear_probe import LinearProbe, LinearProbeCV, fit_linear_head
from medmeta.learners.maml import ANIL, FOMAML, MAML, AdaptedTask, MetaSGD, ProtoMAML
from medmeta.learners.matchingnet import MatchingNet
from medmeta.learners.metric import MetricLearner
from medmeta.learners.pmf import PMF
from medmeta.learners.pretrain import MixedBatchSampler, MultiTaskPretrainer, TaskBatch
from medmeta.learners.protonet import ProtoNet, Prototypes, class_prototypes, prototype_head, prototype_logits
from medmeta.learners.pt_map import PTMAP
from medmeta.learners.r2d2 import R2D2
from medmeta.learners.registry import LEARNERS, create_learner, is_learner, list_learners, register_learner
from medmeta.learners.relationnet import RelationNet
from medmeta.learners.reptile import Reptile
from medmeta.learners.state import load_learner, save_learner
from medmeta.learners.tim import TIM, AlphaTIM
from medmeta.learners.transductive import TransductiveFeatureLearner
from medmeta.learners.transductive_finetune import TransductiveFineTune

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
    "LinearProbeCV",
    "PMF",
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
    "MetricLearner",
    "MatchingNet",
    "RelationNet",
    "FEAT",
    "BaselinePP",
    "CosineHead",
    "R2D2",
    "Reptile",
    "TransductiveFeatureLearner",
    "TIM",
    "AlphaTIM",
    "PTMAP",
    "LaplacianShot",
    "BDCSPN",
    "TransductiveFineTune",
    "LEARNERS",
    "create_learner",
    "list_learners",
    "register_learner",
    "is_learner",
    "save_learner",
    "load_learner",
]
