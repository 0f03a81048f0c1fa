"""Turn the errors a user can fix (a wrong option, path, name, checkpoint or too little data)
into one clear line and exit status 2 in the command-line apps, instead of Hydra's traceback.

Library calls (``run_training``, ``run_evaluation``) still raise: scripts and tests want the
exception. Errors not in :data:`USER_ERRORS` are bugs and keep their full traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TypeVar

from medmeta.data.errors import DataFormatError
from medmeta.data.package_images import PackageImageError
from medmeta.episodes.samplers import InsufficientDataError
from medmeta.training.checkpoint import IncompatibleCheckpointError
from medmeta.training.components import ConfigError

__all__ = ["USER_ERRORS", "exit_on_user_error"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataFormatError,
    IncompatibleCheckpointError,
    InsufficientDataError,
    PackageImageError,
)

T = TypeVar("T")


def exit_on_user_error(app: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; on a user error log it (run folder log included), print ``<app>: error: ...``
    to stderr and exit with status 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        logging.getLogger("medmeta.training").error("%s: %s", type(err).__name__, err)
        print(f"{app}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
