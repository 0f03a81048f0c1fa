"""Console commands ``medmeta-train`` and ``medmeta-evaluate`` (Hydra apps).

They run the same apps as ``experiments/train.py`` and ``experiments/evaluate.py`` and accept
the same Hydra overrides (``medmeta-train experiment=mm_maml trainer.steps=100``). Both read the
configs from the package ``medmeta.conf`` (Hydra's search path ``pkg://medmeta.conf``; in the
repository it is the top-level ``conf/`` folder, which setup.cfg installs as that package), so an
installed wheel works from any folder. Your own configs go in front of the shipped ones with
Hydra's ``--config-dir /my/conf`` or ``hydra.searchpath=[file:///my/conf]``: a file there adds
a group option (``/my/conf/learner/mine.yaml`` -> ``learner=mine``) or replaces the shipped
file of the same name (see docs/experiments.md).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["train", "evaluate", "config_dir", "CONFIG_PACKAGE", "CONFIG_PATH"]

CONFIG_PACKAGE = "medmeta.conf"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"  # what hydra.main / initialize_config_module are given


def config_dir() -> Path:
    """The folder of the installed configs (package ``medmeta.conf``), e.g. for Hydra's
    ``initialize_config_dir``; a :class:`~medmeta.errors.MissingDataError` when the package is
    missing (an editable install made before the configs were packaged: run ``pip install -e .``
    again)."""
    from medmeta.errors import MissingDataError

    try:
        spec = importlib.util.find_spec(CONFIG_PACKAGE)
    except ImportError:
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / "train.yaml").is_file():
        raise MissingDataError(
            f"medmeta's Hydra configs (package {CONFIG_PACKAGE}) are not installed: reinstall medmeta "
            "(pip install medmeta-<version>.whl, or pip install -e . again in a checkout, which maps conf/ to it)"
        )
    return Path(locations[0])


def _run(app: str, config_name: str, task: Callable[[Any], Any]) -> None:
    from medmeta.errors import exit_on_user_error

    exit_on_user_error(app, config_dir)  # one clear line instead of Hydra's "primary config module not found"
    import hydra

    import medmeta.config  # noqa: F401  (registers the schemas and resolvers)

    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)()


def _train_task(cfg: Any) -> Optional[float]:
    from medmeta.errors import exit_on_user_error
    from medmeta.training.run import run_training

    return exit_on_user_error("medmeta-train", run_training, cfg).get("best_metric")


def _evaluate_task(cfg: Any) -> None:
    from medmeta.errors import exit_on_user_error
    from medmeta.training.run import run_evaluation

    exit_on_user_error("medmeta-evaluate", run_evaluation, cfg)


def train() -> None:
    """``medmeta-train``: meta-training / pre-training app (config ``train.yaml``)."""
    _run("medmeta-train", "train", _train_task)


def evaluate() -> None:
    """``medmeta-evaluate``: evaluation app (config ``evaluate.yaml``)."""
    _run("medmeta-evaluate", "evaluate", _evaluate_task)
