"""Collect every run of a Hydra ``--multirun`` sweep into one table, ranked then aggregated.

A sweep folder holds one sub-folder per job (``0/``, ``1/`` ...), each with
``.hydra/overrides.yaml`` (what the job changed) and the protocol's tidy ``results.csv``
(``test/results.csv`` for train runs, ``results.csv`` for evaluate runs). Methods are named by
their ``method`` column, extended by the overrides that vary across the sweep when the method
name alone does not tell runs apart (a sweep over backbones or shots of one learner). The
ranking is the L2L rank-then-aggregate score (:func:`medmeta.evaluation.rank_then_aggregate`):
methods ranked per task, ranks averaged.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from medmeta.errors import ConfigError, MissingDataError

__all__ = ["SweepResults", "collect_sweep", "find_runs", "write_sweep_report", "format_ranking", "scale_of"]

RESULT_FILES = ("test/results.csv", "results.csv")


@dataclass
class SweepResults:
    """All rows of a sweep (``results``), the per-method ranking and what was left out."""

    results: pd.DataFrame
    ranking: pd.DataFrame
    score: str
    higher_is_better: bool
    runs: list[dict[str, Any]]
    missing: list[str]


def find_runs(sweep_dir: "str | Path") -> list[Path]:
    """Job folders of a sweep (folders holding ``.hydra/overrides.yaml``), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingDataError(f"sweep folder {sweep_dir} does not exist")
    runs = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]

    def key(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(x)) if x.isdigit() else (1, x) for x in rel)

    return sorted(set(runs), key=key)


def _overrides(run: Path) -> list[str]:
    with open(run / ".hydra" / "overrides.yaml", encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or []
    return [str(o) for o in data]


def _protocol_of(run: Path) -> dict[str, Any]:
    for name in ("config.yaml", ".hydra/config.yaml"):
        path = run / name
        if path.is_file():
            with open(path, encoding="utf-8") as handle:
                cfg = yaml.safe_load(handle) or {}
            proto = cfg.get("protocol") or {}
            if proto:
                return proto
    return {}


def collect_sweep(
    sweep_dir: "str | Path",
    score: Optional[str] = None,
    higher_is_better: Optional[bool] = None,
) -> SweepResults:
    """Read every run of ``sweep_dir`` (see module doc) into one ranked table.

    ``score`` defaults to the protocol's primary metric recorded in the runs' configs.
    """
    from medmeta.evaluation.ranking import rank_then_aggregate

    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise MissingDataError(f"{sweep_dir}: no Hydra job folders (with .hydra/overrides.yaml) found")
    overrides = {run: _overrides(run) for run in runs}
    common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    frames, infos, missing = [], [], []
    protocol: dict[str, Any] = {}
    for run in runs:
        path = next((run / f for f in RESULT_FILES if (run / f).is_file()), None)
        if path is None:
            missing.append(str(run))
            continue
        df = pd.read_csv(path)
        varying = [o for o in overrides[run] if o not in common]
        df.insert(0, "run", str(run.relative_to(sweep_dir)))
        df.insert(1, "overrides", " ".join(varying))
        frames.append(df)
        infos.append({"run": str(run.relative_to(sweep_dir)), "overrides": varying, "results": str(path)})
        protocol = protocol or _protocol_of(run)
    if missing:
        warnings.warn(f"collect_sweep: {len(missing)} run(s) without results (failed or unfinished): {missing}", stacklevel=2)
    if not frames:
        raise MissingDataError(f"{sweep_dir}: none of the {len(runs)} runs has a results.csv")
    table = pd.concat(frames, ignore_index=True)
    table.insert(2, "base_method", table["method"])
    per_run = table.groupby("base_method")["run"].nunique()
    if (per_run > 1).any():  # the method name alone does not identify a run: add the overrides
        table["method"] = [
            f"{m} [{o}]" if o else m for m, o in zip(table["base_method"], table["overrides"])
        ]
    score = score or str(protocol.get("primary_metric") or "auroc")
    if higher_is_better is None:
        higher_is_better = bool(protocol.get("higher_is_better", True))
    if score not in table.columns:
        raise ConfigError(f"collect_sweep: score {score!r} is not a column of the results; columns: {list(table.columns)}")
    ranking = rank_then_aggregate(table, score=score, higher_is_better=higher_is_better)
    return SweepResults(table, ranking, score, higher_is_better, infos, missing)


def write_sweep_report(results: SweepResults, out_dir: "str | Path", scale: float = 1.0) -> dict[str, Path]:
    """``sweep_results.csv`` (every row), ``sweep_ranking.csv`` and ``sweep_summary.md``."""
    from medmeta.io import write_bytes_atomic

    out_dir = Path(out_dir)
    paths = {
        "results": write_bytes_atomic(out_dir / "sweep_results.csv", results.results.to_csv(index=False).encode()),
        "ranking": write_bytes_atomic(out_dir / "sweep_ranking.csv", results.ranking.to_csv(index=False).encode()),
    }
    lines = [
        f"# Sweep ranking ({results.score}, rank then aggregate over tasks)",
        "",
        "| method | mean rank | tasks | mean " + results.score + " |",
        "|---|---|---|---|",
    ]
    for r in results.ranking.itertuples():
        lines.append(f"| {r.method} | {r.mean_rank:.2f} | {r.tasks} | {r.mean_score * scale:.2f} |")
    if results.missing:
        lines += ["", f"Runs without results: {', '.join(results.missing)}"]
    paths["summary"] = write_bytes_atomic(out_dir / "sweep_summary.md", ("\n".join(lines) + "\n").encode())
    return paths


def format_ranking(results: SweepResults, scale: float = 1.0) -> str:
    """The ranking as a plain-text table (printed by ``experiments/collect_sweep.py``)."""
    rows = [["method", "mean rank", "tasks", f"mean {results.score}"]]
    rows += [[r.method, f"{r.mean_rank:.2f}", str(r.tasks), f"{r.mean_score * scale:.2f}"] for r in results.ranking.itertuples()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def scale_of(results: SweepResults, runs_dir: "str | Path", default: float = 1.0) -> float:
    """The protocol's report scale of the score (e.g. 100 for AUROC), read from a run config."""
    for info in results.runs:
        proto = _protocol_of(Path(runs_dir) / info["run"])
        if proto:
            return float((proto.get("report_scale") or {}).get(results.score, default))
    return default


