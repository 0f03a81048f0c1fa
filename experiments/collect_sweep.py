"""Collect every run of a --multirun sweep into one table with the rank-then-aggregate score.

    python experiments/collect_sweep.py outputs/multirun/train/2025-01-01/12-00-00
    python experiments/collect_sweep.py <sweep folder> --score accuracy --out reports/

Writes sweep_results.csv, sweep_ranking.csv and sweep_summary.md (into the sweep folder unless
--out is given) and prints the ranking. The logic is medmeta.training.sweep.collect_sweep.
"""
from __future__ import annotations

import argparse

from medmeta.errors import exit_on_user_error
from medmeta.training.sweep import collect_sweep, format_ranking, scale_of, write_sweep_report


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the sweep folder (hydra.sweep.dir) holding one folder per job")
    parser.add_argument("--score", default=None, help="metric to rank by (default: the protocol's primary metric)")
    parser.add_argument("--lower-is-better", action="store_true", help="rank ascending (e.g. for mae)")
    parser.add_argument("--out", default=None, help="where to write the reports (default: the sweep folder)")
    args = parser.parse_args(argv)
    results = exit_on_user_error(
        "collect_sweep", collect_sweep, args.sweep_dir, score=args.score,
        higher_is_better=False if args.lower_is_better else None,
    )
    scale = scale_of(results, args.sweep_dir)
    paths = write_sweep_report(results, args.out or args.sweep_dir, scale=scale)
    print(f"{len(results.runs)} run(s), {results.results['method'].nunique()} method(s); score: {results.score}"
          + (f" x{scale:g}" if scale != 1 else ""))
    print(format_ranking(results, scale=scale))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
