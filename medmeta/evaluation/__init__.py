"""Evaluation: metrics, rank aggregation, protocols (l2l, medimeta, custom), feature caching, reports."""
from __future__ import annotations

from medmeta.evaluation.feature_cache import FeatureCache
from medmeta.evaluation.metrics import (
    MeanCI,
    accuracy,
    auroc,
    balanced_accuracy,
    binary_auroc,
    episode_metrics,
    mean_ci,
    ordinal_mae,
)
from medmeta.evaluation.protocols import (
    PROTOCOLS,
    ProtocolConfig,
    custom_protocol,
    evaluate_episodes,
    get_protocol,
    l2l_protocol,
    medimeta_protocol,
    protocol_episodes,
    run_protocol,
)
from medmeta.evaluation.ranking import rank_then_aggregate, task_ranks
from medmeta.evaluation.reports import markdown_summary, plot_scores_vs_shots, summarize, write_csv, write_report

__all__ = [
    "MeanCI",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "binary_auroc",
    "episode_metrics",
    "mean_ci",
    "ordinal_mae",
    "rank_then_aggregate",
    "task_ranks",
    "ProtocolConfig",
    "PROTOCOLS",
    "l2l_protocol",
    "medimeta_protocol",
    "custom_protocol",
    "get_protocol",
    "protocol_episodes",
    "evaluate_episodes",
    "run_protocol",
    "FeatureCache",
    "summarize",
    "markdown_summary",
    "plot_scores_vs_shots",
    "write_csv",
    "write_report",
]
