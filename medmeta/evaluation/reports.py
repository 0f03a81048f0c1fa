"""Reports of a protocol run: tidy CSV, Markdown summary, score-against-shots plot, and the
plain-text result table and JSON summary that the apps print and store.

Everything is written atomically (temporary file + ``os.replace``). Plots use matplotlib's
object API with the Agg canvas, so they never touch pyplot's global state or need a display.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from medmeta.evaluation.metrics import METRICS, mean_ci
from medmeta.evaluation.ranking import rank_then_aggregate
from medmeta.io import write_bytes_atomic

__all__ = [
    "write_csv",
    "summarize",
    "markdown_summary",
    "plot_scores_vs_shots",
    "write_report",
    "results_table",
    "transductive_methods",
    "protocol_summary",
    "write_bytes_atomic",
]

log = logging.getLogger("medmeta.evaluation")


def write_csv(df: pd.DataFrame, path: Union[str, Path]) -> Path:
    """The tidy table as CSV (atomic)."""
    return write_bytes_atomic(path, df.to_csv(index=False).encode("utf-8"))


def _metric_columns(df: pd.DataFrame, metrics: Optional[Sequence[str]]) -> list[str]:
    if metrics is not None and not (isinstance(metrics, (list, tuple)) and all(isinstance(m, str) for m in metrics)):
        raise TypeError(f"metrics: expected a list of metric names such as ['auroc', 'accuracy'], got {metrics!r}")
    cols = [m for m in (metrics or METRICS) if m in df.columns]
    if not cols:
        raise ValueError(f"reports: none of the metrics {list(metrics or METRICS)} is a column of the table")
    return cols


def summarize(
    df: pd.DataFrame, metrics: Optional[Sequence[str]] = None, by: Sequence[str] = ("dataset", "task", "method")
) -> pd.DataFrame:
    """Mean, 95% CI half-width and count of every metric per group (default: task and method)."""
    cols = _metric_columns(df, metrics)
    records = []
    for key, group in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rec: dict[str, Any] = dict(zip(by, key))
        rec["episodes"] = len(group)
        for m in cols:
            ci = mean_ci(group[m])
            rec[f"{m}_mean"], rec[f"{m}_ci"], rec[f"{m}_n"] = ci.mean, ci.half_width, ci.n
        records.append(rec)
    return pd.DataFrame(records)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(mean: float, half: float, scale: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} ± {half * scale:.2f}"


def markdown_summary(
    df: pd.DataFrame,
    metrics: Optional[Sequence[str]] = None,
    scale: Optional[Mapping[str, float]] = None,
    title: str = "Results",
    rank_metric: Optional[str] = None,
    higher_is_better: bool = True,
    skipped: Optional[Sequence[Mapping[str, Any]]] = None,
) -> str:
    """A Markdown report: per task and method, mean ± 95% CI of every metric (and, with
    ``rank_metric``, the rank-then-aggregate table), plus what was skipped."""
    scale = dict(scale or {})
    cols = _metric_columns(df, metrics)
    summary = summarize(df, cols)
    header = ["dataset", "task", "method", "episodes"] + [
        f"{m} (x{scale[m]:g})" if scale.get(m, 1.0) != 1.0 else m for m in cols
    ]
    rows = [
        [r["dataset"], r["task"], r["method"], r["episodes"]]
        + [_fmt(r[f"{m}_mean"], r[f"{m}_ci"], scale.get(m, 1.0)) for m in cols]
        for _, r in summary.iterrows()
    ]
    parts = [f"# {title}", "", "Mean ± 95% CI (1.96 x standard error over episodes).", "", _markdown_table(header, rows)]
    transductive = transductive_methods(df)
    if transductive:
        parts += ["", f"Transductive (they use the unlabelled query set): {', '.join(transductive)}."]
    if rank_metric is not None and df["method"].nunique() > 0:
        ranking = rank_then_aggregate(df, score=rank_metric, higher_is_better=higher_is_better)
        s = scale.get(rank_metric, 1.0)
        parts += [
            "",
            f"## Rank then aggregate ({rank_metric}; averaged over shots per task, ranked per task)",
            "",
            _markdown_table(
                ["method", "mean rank", "tasks", f"mean {rank_metric}"],
                [[r.method, f"{r.mean_rank:.2f}", r.tasks, f"{r.mean_score * s:.2f}"] for r in ranking.itertuples()],
            ),
        ]
    if "shots" in df.columns and df["shots"].nunique() > 1:
        m = rank_metric or cols[0]
        per_shot = summarize(df, [m], by=("method", "shots"))
        shots = sorted(df["shots"].unique())
        methods = sorted(df["method"].unique())
        table = []
        for method in methods:
            sub = per_shot[per_shot["method"] == method].set_index("shots")
            table.append(
                [method]
                + [
                    _fmt(sub.loc[k, f"{m}_mean"], sub.loc[k, f"{m}_ci"], scale.get(m, 1.0)) if k in sub.index else "-"
                    for k in shots
                ]
            )
        parts += ["", f"## {m} by shots (all tasks)", "", _markdown_table(["method", *[str(k) for k in shots]], table)]
    if skipped:
        parts += ["", f"## Skipped ({len(skipped)})", ""]
        parts += [
            f"- {s.get('dataset')}/{s.get('task')} shots={s.get('shots')}"
            + (f" class {s['class']!r}" if s.get("class") else "")
            + f": {s.get('reason')}"
            for s in skipped
        ]
    return "\n".join(parts) + "\n"


def plot_scores_vs_shots(
    df: pd.DataFrame,
    metric: str,
    path: Union[str, Path],
    scale: float = 1.0,
    title: Optional[str] = None,
) -> Path:
    """One panel per task: mean ``metric`` (± 95% CI) against shots, one line per method (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in df.columns:
        raise ValueError(f"plot_scores_vs_shots: {metric!r} is not a column of the table")
    summary = summarize(df, [metric], by=("dataset", "task", "method", "shots"))
    tasks = summary[["dataset", "task"]].drop_duplicates().values.tolist()
    ncols = min(3, max(1, len(tasks)))
    nrows = -(-len(tasks) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), constrained_layout=True)
    FigureCanvasAgg(fig)
    for i, (dataset, task) in enumerate(tasks):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        sub = summary[(summary["dataset"] == dataset) & (summary["task"] == task)]
        for method, g in sub.groupby("method", sort=True):
            g = g.sort_values("shots")
            ax.errorbar(
                g["shots"], g[f"{metric}_mean"] * scale, yerr=g[f"{metric}_ci"].fillna(0) * scale,
                marker="o", capsize=3, label=str(method),
            )
        ax.set_title(f"{dataset}: {task}", fontsize=9)
        ax.set_xlabel("shots")
        ax.set_ylabel(metric + (f" x{scale:g}" if scale != 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_bytes_atomic(path, buf.getvalue())


def write_report(df: pd.DataFrame, out_dir: Union[str, Path], config: Any = None) -> dict[str, Path]:
    """``results.csv``, ``summary.md`` and ``<metric>_vs_shots.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    metrics = list(getattr(config, "metrics", None) or [m for m in METRICS if m in df.columns])
    scale = dict(getattr(config, "report_scale", {}) or {})
    primary = getattr(config, "primary_metric", metrics[0])
    rank = primary if getattr(config, "aggregate", None) == "rank" else None
    name = getattr(config, "name", "protocol")
    paths = {"csv": write_csv(df, out_dir / "results.csv")}
    text = markdown_summary(
        df,
        metrics,
        scale,
        title=f"{name} protocol results",
        rank_metric=rank,
        higher_is_better=getattr(config, "higher_is_better", True),
        skipped=df.attrs.get("skipped"),
    )
    paths["markdown"] = write_bytes_atomic(out_dir / "summary.md", text.encode("utf-8"))
    if len(df):
        paths["plot"] = plot_scores_vs_shots(
            df, primary, out_dir / f"{primary}_vs_shots.png", scale=scale.get(primary, 1.0), title=f"{name} protocol"
        )
    return paths


def _report_scale(protocol: Any, metric: str) -> float:
    return float(dict(getattr(protocol, "report_scale", {}) or {}).get(metric, 1.0))


def _task_score(rows: pd.DataFrame, metric: str) -> float:
    """A task's score: the metric averaged over episodes per shot count, then over shot counts (L2L)."""
    per_shot = rows.groupby("shots")[metric].mean() if "shots" in rows else rows[metric]
    return float(per_shot.mean()) if len(per_shot) else float("nan")


def transductive_methods(df: pd.DataFrame) -> list[str]:
    """Methods whose rows are marked ``transductive`` (they used the unlabelled query set), in
    table order; none for tables without the column (results written before it existed)."""
    if "transductive" not in df.columns:
        return []
    marked = df[df["transductive"].astype(bool)]["method"]
    return list(dict.fromkeys(marked))


def results_table(df: pd.DataFrame, protocol: Any) -> str:
    """A plain-text table of the protocol's primary metric: one row per task, one column per
    method (mean ± 95% CI over episodes and shots, scaled as the protocol reports), then the mean
    over tasks and, with two or more methods, the mean rank (rank then aggregate).

    Transductive methods (:func:`transductive_methods`) come after the inductive ones, under their
    own column-group heading; ranks are over all methods. Without them the table has no groups."""
    metric = protocol.primary_metric
    scale = _report_scale(protocol, metric)
    methods = list(dict.fromkeys(df["method"]))
    transductive = transductive_methods(df)
    if transductive:
        methods = [m for m in methods if m not in transductive] + transductive
    tasks = list(dict.fromkeys(zip(df["dataset"], df["task"])))
    header = ["task"] + methods
    rows: list[list[str]] = []
    per_task_means: dict[str, list[float]] = {m: [] for m in methods}
    for dataset, task in tasks:
        row = [f"{dataset}/{task}"]
        for m in methods:
            sub = df[(df["dataset"] == dataset) & (df["task"] == task) & (df["method"] == m)]
            ci = mean_ci(sub[metric])  # the CI is over all the task's episodes
            value = _task_score(sub, metric)
            per_task_means[m].append(value)
            row.append("n/a" if np.isnan(value) else f"{value * scale:.2f} ± {ci.half_width * scale:.2f}")
        rows.append(row)
    footer = [["mean over tasks"] + [f"{np.nanmean(per_task_means[m]) * scale:.2f}" for m in methods]]
    if len(methods) > 1:
        try:
            ranks = rank_then_aggregate(df, score=metric, higher_is_better=protocol.higher_is_better)
            by = dict(zip(ranks["method"], ranks["mean_rank"]))
            footer.append(["mean rank"] + [f"{by.get(m, float('nan')):.2f}" for m in methods])
        except ValueError as err:  # e.g. a metric undefined on some task
            log.warning("rank then aggregate not available: %s", err)
    table = [header] + rows + footer
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    groups: list[tuple[str, int, int]] = []  # (label, first column, columns)
    if transductive:
        n_inductive = len(methods) - len(transductive)
        groups = [g for g in (("inductive", 1, n_inductive), ("transductive", 1 + n_inductive, len(transductive))) if g[2]]
        for label, start, n in groups:  # widen a group's last column until its heading fits
            span = sum(widths[start : start + n]) + 2 * (n - 1)
            widths[start + n - 1] += max(0, len(label) + 2 - span)

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    title = f"{protocol.name}: {metric}" + (f" x{scale:g}" if scale != 1 else "") + " (mean ± 95% CI)"
    sep = "-" * len(line(header))
    heading = [line(header)]
    if groups:
        spans = [f" {label} ".center(sum(widths[start : start + n]) + 2 * (n - 1), "-") for label, start, n in groups]
        heading.insert(0, "  ".join([" " * widths[0], *spans]))
    return "\n".join([title, sep, *heading, sep, *[line(r) for r in rows], sep, *[line(r) for r in footer]])


def protocol_summary(df: pd.DataFrame, protocol: Any) -> dict[str, Any]:
    """The primary metric per method (scaled as the protocol reports): each task's score, their
    mean over tasks and the number of episodes (what ``final_metrics.json`` stores)."""
    metric = protocol.primary_metric
    scale = _report_scale(protocol, metric)
    out: dict[str, Any] = {"protocol": protocol.name, "metric": metric, "scale": scale, "methods": {}}
    for method, sub in df.groupby("method", sort=False):
        tasks = {}
        for (dataset, task), g in sub.groupby(["dataset", "task"], sort=True):
            tasks[f"{dataset}/{task}"] = _task_score(g, metric) * scale
        values = [v for v in tasks.values() if not np.isnan(v)]
        out["methods"][str(method)] = {
            "mean_over_tasks": float(np.mean(values)) if values else float("nan"),
            "tasks": tasks,
            "episodes": int(len(sub)),
        }
    return out
