"""medmeta: cross-domain few-shot learning for medical imaging on MedIMeta-format meta-datasets.

The top level is light (no torch or timm until used): the timm-style entry points load their
module on first access::

    import medmeta

    learner = medmeta.create_learner("protonet", medmeta.create_backbone("medmeta_conv4_tiny"))
    medmeta.list_learners(), medmeta.list_backbones("resnet*")
"""
from typing import TYPE_CHECKING

from medmeta.errors import MedMetaError, UserError
from medmeta.registry import lazy_exports
from medmeta.tasks import Episode, TaskDescription, TaskTarget

if TYPE_CHECKING:  # the real signatures for type checkers; at run time they load lazily
    from medmeta.backbones.pretrained import list_pretrained_sources
    from medmeta.backbones.timm_backbone import create_backbone, list_backbones
    from medmeta.learners.registry import create_learner, list_learners, register_learner

__version__ = "0.1.0"

_EXPORTS = {
    "create_learner": "learners.registry",
    "list_learners": "learners.registry",
    "register_learner": "learners.registry",
    "create_backbone": "backbones.timm_backbone",
    "list_backbones": "backbones.timm_backbone",
    "list_pretrained_sources": "backbones.pretrained",
}

__all__ = [
    "Episode",
    "TaskDescription",
    "TaskTarget",
    "MedMetaError",
    "UserError",
    "create_learner",
    "list_learners",
    "register_learner",
    "create_backbone",
    "list_backbones",
    "list_pretrained_sources",
    "__version__",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
