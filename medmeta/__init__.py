"""medmeta: cross-domain few-shot learning for medical imaging on MedIMeta-format meta-datasets."""
from medmeta.tasks import Episode, TaskDescription, TaskTarget

__version__ = "0.1.0"

__all__ = ["Episode", "TaskDescription", "TaskTarget", "__version__"]
