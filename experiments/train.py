"""Meta-train an episodic learner or pre-train mm-PT, then test it (Hydra app, conf/train.yaml).

    python experiments/train.py                                    # ProtoNet, synthetic data
    python experiments/train.py experiment=mm_maml trainer.steps=300  # MedIMeta mm-MAML on the synthetic set, a few minutes
    python experiments/train.py experiment=mm_maml data=medimeta data.root=/data/medimeta \
        data.target=bus backbone=resnet18                          # the paper's setting
    python experiments/train.py --multirun learner=protonet,maml   # a sweep

The logic lives in medmeta.training.run.run_training; this file only binds it to Hydra.
"""
from __future__ import annotations

from typing import Optional

import hydra
from omegaconf import DictConfig

import medmeta.config  # noqa: F401  (registers the structured configs and resolvers)
from medmeta.cli import CONFIG_PATH  # pkg://medmeta.conf, as medmeta-train (conf/ in a checkout)
from medmeta.errors import exit_on_user_error
from medmeta.training.run import run_training


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the best validation metric (what the Optuna sweeper optimises)."""
    return exit_on_user_error("train.py", run_training, cfg).get("best_metric")


if __name__ == "__main__":
    main()
