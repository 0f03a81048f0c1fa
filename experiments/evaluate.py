"""Evaluate learners under a protocol and print the result table (Hydra app, conf/evaluate.yaml).

    python experiments/evaluate.py                       # ProtoNet, linear probe, fine-tuning on real_mini
    python experiments/evaluate.py protocol=l2l data=medimeta data.root=/data/medimeta data.target=bus
    python experiments/evaluate.py checkpoint=outputs/train/maml/<run> +learner@learners.maml=maml

The logic lives in medmeta.training.run.run_evaluation; this file only binds it to Hydra.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import medmeta.config  # noqa: F401  (registers the structured configs and resolvers)
from medmeta.cli import CONFIG_PATH  # pkg://medmeta.conf, as medmeta-evaluate (conf/ in a checkout)
from medmeta.errors import exit_on_user_error
from medmeta.training.run import run_evaluation


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("evaluate.py", run_evaluation, cfg)


if __name__ == "__main__":
    main()
