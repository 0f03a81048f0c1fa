"""Rank then aggregate (the L2L challenge ranking): rank methods per task, average the ranks.

No task weighs more than another, whatever its score scale. A task's score of a method is the
mean over shot counts of the per-shot mean score when the table has a ``shots`` column (the
L2L score: accuracy averaged over N), else the mean over rows. Ties get the average of the
ranks they span (two methods sharing first place both get 1.5); rank 1 is the best.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["task_scores", "task_ranks", "rank_then_aggregate"]


def _task_cols(df: pd.DataFrame, task_cols: Optional[Sequence[str]]) -> list[str]:
    if task_cols is not None:
        cols = list(task_cols)
    else:
        cols = [c for c in ("dataset", "task") if c in df.columns]
    if not cols:
        raise ValueError("rank_then_aggregate: the table needs task columns ('dataset', 'task') or task_cols=")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"rank_then_aggregate: columns {missing} are missing; the table has {list(df.columns)}")
    return cols


def task_scores(
    df: pd.DataFrame, score: str = "accuracy", method_col: str = "method", task_cols: Optional[Sequence[str]] = None
) -> pd.DataFrame:
    """One row per (task, method) with its score (see module doc)."""
    cols = _task_cols(df, task_cols)
    for c in (score, method_col):
        if c not in df.columns:
            raise ValueError(f"rank_then_aggregate: column {c!r} is missing; the table has {list(df.columns)}")
    keys = [*cols, method_col]
    if "shots" in df.columns:
        per_shot = df.groupby([*keys, "shots"], dropna=False)[score].mean().reset_index()
        scores = per_shot.groupby(keys, dropna=False)[score].mean().reset_index()
    else:
        scores = df.groupby(keys, dropna=False)[score].mean().reset_index()
    if scores[score].isna().any():
        bad = scores[scores[score].isna()][keys].to_dict("records")
        raise ValueError(f"rank_then_aggregate: {score!r} is undefined (NaN) for {bad[:5]}")
    methods = set(scores[method_col])
    for task, group in scores.groupby(cols, dropna=False):
        absent = methods - set(group[method_col])
        if absent:
            raise ValueError(f"rank_then_aggregate: methods {sorted(absent)} have no result on task {task}")
    return scores


def task_ranks(
    df: pd.DataFrame,
    score: str = "accuracy",
    higher_is_better: bool = True,
    method_col: str = "method",
    task_cols: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Per-task scores with the rank of each method within its task (average ranks for ties)."""
    cols = _task_cols(df, task_cols)
    scores = task_scores(df, score, method_col, cols)
    scores["rank"] = scores.groupby(cols, dropna=False)[score].rank(method="average", ascending=not higher_is_better)
    return scores


def rank_then_aggregate(
    df: pd.DataFrame,
    score: str = "accuracy",
    higher_is_better: bool = True,
    method_col: str = "method",
    task_cols: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Methods ranked per task, ranks averaged: columns ``method, mean_rank, tasks, mean_score``,
    best first (ties in mean rank keep method name order)."""
    ranks = task_ranks(df, score, higher_is_better, method_col, task_cols)
    out = (
        ranks.groupby(method_col)
        .agg(mean_rank=("rank", "mean"), tasks=("rank", "size"), mean_score=(score, "mean"))
        .reset_index()
        .rename(columns={method_col: "method"})
    )
    out["tasks"] = out["tasks"].astype(np.int64)
    return out.sort_values(["mean_rank", "method"], kind="stable").reset_index(drop=True)
