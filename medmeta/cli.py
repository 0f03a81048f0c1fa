"""Console commands ``medmeta-train`` and ``medmeta-evaluate`` (Hydra apps on ``conf/``).

They run the same apps as ``experiments/train.py`` and ``experiments/evaluate.py`` and accept
the same Hydra overrides (``medmeta-train experiment=mm_maml trainer.steps=100``). The config
folder is looked up, in order: ``$MEDMETA_CONFIG_DIR``; ``medmeta/conf`` inside the installed
package; ``conf/`` beside the package (a checkout or an editable install). When none exists
the command says so and how to fix it, instead of a Hydra traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["train", "evaluate", "config_dir", "CONFIG_ENV"]

CONFIG_ENV = "MEDMETA_CONFIG_DIR"
_MARKERS = ("train.yaml", "evaluate.yaml")


def _has_configs(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in _MARKERS)


def config_dir() -> Path:
    """The folder holding medmeta's Hydra configs (see module doc)."""
    import medmeta

    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not _has_configs(path):
            raise FileNotFoundError(
                f"{CONFIG_ENV}={env}: expected a folder with {' and '.join(_MARKERS)} (medmeta's conf/ folder)"
            )
        return path
    package = Path(medmeta.__file__).resolve().parent
    candidates = [package / "conf", package.parent / "conf"]
    for path in candidates:
        if _has_configs(path):
            return path
    raise FileNotFoundError(
        "medmeta's Hydra configs were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + f"). Run from a checkout (pip install -e .), or set {CONFIG_ENV}=/path/to/medmeta/conf"
    )


def _run(config_name: str, task: Callable[[Any], Any]) -> None:
    try:
        path = config_dir()
    except FileNotFoundError as err:
        print(f"medmeta-{config_name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import hydra

    import medmeta.config  # noqa: F401  (registers the schemas and resolvers)

    hydra.main(version_base="1.3", config_path=str(path), config_name=config_name)(task)()


def _train_task(cfg: Any) -> Optional[float]:
    from medmeta.errors import exit_on_user_error
    from medmeta.training.run import run_training

    return exit_on_user_error("medmeta-train", run_training, cfg).get("best_metric")


def _evaluate_task(cfg: Any) -> None:
    from medmeta.errors import exit_on_user_error
    from medmeta.training.run import run_evaluation

    exit_on_user_error("medmeta-evaluate", run_evaluation, cfg)


def train() -> None:
    """``medmeta-train``: meta-training / pre-training app (see ``conf/train.yaml``)."""
    _run("train", _train_task)


def evaluate() -> None:
    """``medmeta-evaluate``: evaluation app (see ``conf/evaluate.yaml``)."""
    _run("evaluate", _evaluate_task)
