"""The learners results table: every registered test-time learner on the embedded real-image set.

Every learner of ``medmeta.list_learners()`` that adapts at test time (``mm_pt`` is left out: it
is a pre-training method, whose test-time learner is ``finetune``) runs on the same frozen
episodes of the embedded real-image mini meta-dataset (``medmeta.recipes.open_default("real")``,
3 channels, ImageNet normalisation) with one backbone, the offline ImageNet MobileNetV2
(``pretrained="imagenet-mobilenetv2"``); frozen-backbone learners are solved on cached features.
Learners that need meta-training are evaluated as they are at test time on ImageNet features.

* **L2L protocol** (MICCAI 2023 Learn2Learn): accuracy per task averaged over the shot counts,
  methods ranked per task, ranks averaged (rank then aggregate).
* **MedIMeta protocol**: 5-shot episodes with 10 query images per class, mean AUROC x 100 with a
  95% CI (1.96 x standard error over episodes). The protocols derive episode seeds from
  (seed, dataset, task, shots) only, so the MedIMeta episodes are exactly the L2L protocol's
  5-shot episodes when both use 10 query images per class: this is checked on the episode
  lists, and the 5-shot episodes are then evaluated once (otherwise the MedIMeta protocol runs
  on its own).
* **Seconds per episode**: ``solve`` is the protocol's per-episode time (adapt + predict; for
  cached learners on features), ``wall`` the learner's whole protocol run (embedding, reading
  images) divided by its episodes.

Transductive learners (``transductive = True``: they use the unlabelled query set) get their
own column group. ``--quick`` shortens the test-time optimisation of learners that fine-tune
the backbone (``steps`` 10, ``eval_inner_steps`` 8, ``select_steps`` 5, ``pseudo_episodes`` 1,
where the learner has them and its default is larger); the table says which settings changed.

    python benchmarks/learners_table.py --quick --threads 1      # ~20 min on 2 loaded cores (24 episodes per learner)
    python benchmarks/learners_table.py --quick --instances 5 --threads 1   # the table in docs/learners.md
    python benchmarks/learners_table.py --instances 20 --out docs/learners_table.md  # full, hours on CPU
    python benchmarks/learners_table.py --learners protonet linear_probe_cv --quick
    python benchmarks/learners_table.py --quick --work-dir runs/table --resume   # continue a stopped run
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from medmeta.backbones import create_backbone
from medmeta.config import constructor_parameters
from medmeta.data import MetaDataset
from medmeta.evaluation import l2l_protocol, medimeta_protocol, run_protocol
from medmeta.evaluation.metrics import mean_ci
from medmeta.evaluation.protocols import ProtocolConfig, protocol_episodes
from medmeta.evaluation.ranking import task_ranks
from medmeta.learners import LEARNERS, create_learner, list_learners
from medmeta.threads import apply_num_threads

NOT_TEST_TIME = {"mm_pt": "a pre-training method (trained by medmeta-train; tested with finetune)"}
QUICK = {"steps": 10, "eval_inner_steps": 8, "select_steps": 5, "pseudo_episodes": 1}
BACKBONE = ("mobilenetv2_100", "imagenet-mobilenetv2")


def _fmt(value: float, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value * scale:.{digits}f}"


def _md(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def learner_plan(names: Optional[Sequence[str]], quick: bool) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``name -> constructor overrides`` of the learners to run, and ``name -> why left out``."""
    chosen = list(names) if names else list_learners()
    plan: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in chosen:
        if name in NOT_TEST_TIME:
            skipped[name] = NOT_TEST_TIME[name]
            continue
        factory = LEARNERS.get(name)
        params = constructor_parameters(factory)
        required = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty]
        if "tasks" in inspect.signature(factory).parameters or required:
            skipped[name] = f"needs {required or ['tasks']} (a training set-up), not a test-time learner"
            continue
        overrides: dict[str, Any] = {}
        if quick and not getattr(factory, "frozen_backbone", False):
            for key, value in QUICK.items():
                if key not in params:
                    continue
                default = params[key].default
                larger = isinstance(default, int) and not isinstance(default, bool) and default > value
                if larger or default is None:  # None: derived from another setting (PMF's select_steps = steps)
                    overrides[key] = value
        plan[name] = overrides
    return plan, skipped


def run_learner(
    name: str, overrides: dict[str, Any], meta: MetaDataset, tasks: list[tuple[str, str]], config: ProtocolConfig,
    out_dir: Path, device: str, resume: bool = False,
) -> tuple[pd.DataFrame, float]:
    """One learner's protocol run (fresh backbone, seeded); its rows and wall seconds. With
    ``resume``, a run finished earlier in ``out_dir`` (``results.csv`` + ``wall.json``) is read back."""
    done = out_dir / name / "results.csv"
    record = out_dir / name / "wall.json"
    if resume and done.is_file() and record.is_file():  # a finished run of an interrupted table
        return pd.read_csv(done), float(json.loads(record.read_text())["wall_seconds"])
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE[0], pretrained=BACKBONE[1])
    learner = create_learner(name, backbone, **overrides).to(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = run_protocol({name: learner}, meta, tasks, config, out_dir=out_dir / name, device=device, progress=False)
    wall = time.perf_counter() - t0
    record.write_text(json.dumps({"wall_seconds": wall, "episodes": len(df)}), encoding="utf-8")
    return df, wall


def same_episodes(meta: MetaDataset, tasks: list[tuple[str, str]], l2l: ProtocolConfig, medimeta: ProtocolConfig) -> bool:
    """Whether the MedIMeta protocol's episodes equal the L2L protocol's 5-shot episodes."""
    if 5 not in l2l.shots or l2l.n_query != medimeta.n_query or l2l.instances != medimeta.instances:
        return False
    for dataset_id, task_name in tasks:
        source = meta.source(dataset_id, task_name, split=l2l.split)
        a = [s for s in protocol_episodes(source, l2l, skipped=[]) if s.shots == 5]
        b = protocol_episodes(source, medimeta, skipped=[])
        if len(a) != len(b) or any(
            not (np.array_equal(x.support_positions, y.support_positions) and np.array_equal(x.query_positions, y.query_positions))
            for x, y in zip(a, b)
        ):
            return False
    return True


def tables(
    l2l_df: pd.DataFrame, med_df: pd.DataFrame, walls: dict[str, float], episodes: dict[str, int], groups: dict[str, bool]
) -> str:
    """The Markdown tables: summary (inductive then transductive rows), per-task L2L scores and
    ranks and per-task MedIMeta AUROC (inductive then transductive column groups)."""
    methods = [m for m in groups if m in set(l2l_df["method"])]
    inductive = [m for m in methods if not groups[m]]
    transductive = [m for m in methods if groups[m]]
    ordered = inductive + transductive
    ranks = task_ranks(l2l_df, score="accuracy")
    mean_rank = ranks.groupby("method")["rank"].mean()
    group_rank: dict[str, float] = {}
    for members in (inductive, transductive):
        if members:
            sub = task_ranks(l2l_df[l2l_df["method"].isin(members)], score="accuracy")
            group_rank.update(sub.groupby("method")["rank"].mean().to_dict())
    acc = ranks.groupby("method")["accuracy"].mean()
    med = med_df.groupby(["method", "dataset", "task"])["auroc"].mean().groupby("method").mean()
    solve = l2l_df.groupby("method")["seconds"].mean()

    summary = []
    for m in ordered:
        summary.append([
            ("T: " if groups[m] else "") + m, "transductive" if groups[m] else "inductive",
            f"{mean_rank[m]:.2f}", f"{group_rank[m]:.2f}", _fmt(acc[m]), _fmt(med.get(m, float("nan"))),
            f"{solve[m]:.3f}", f"{walls[m] / max(episodes[m], 1):.3f}",
        ])
    parts = ["### Summary", "", _md(
        ["method", "group", "L2L mean rank (all)", "L2L mean rank (in group)", "L2L accuracy", "MedIMeta AUROC",
         "s/episode (solve)", "s/episode (wall)"], summary)]

    def label(m: str) -> str:
        return ("T: " if groups[m] else "") + m

    task_keys = list(dict.fromkeys(zip(l2l_df["dataset"], l2l_df["task"])))
    rank_rows = []
    for d, t in task_keys:
        sub = ranks[(ranks["dataset"] == d) & (ranks["task"] == t)].set_index("method")
        rank_rows.append([f"{d}/{t}"] + [f"{_fmt(sub.loc[m, 'accuracy'])} ({sub.loc[m, 'rank']:g})" for m in ordered])
    rank_rows.append(["**mean rank**"] + [f"**{mean_rank[m]:.2f}**" for m in ordered])
    parts += ["", "### L2L protocol: accuracy x100 per task (rank among all methods)", "",
              _md(["task"] + [label(m) for m in ordered], rank_rows)]

    med_rows = []
    for d, t in list(dict.fromkeys(zip(med_df["dataset"], med_df["task"]))):
        row = [f"{d}/{t}"]
        for m in ordered:
            ci = mean_ci(med_df[(med_df["dataset"] == d) & (med_df["task"] == t) & (med_df["method"] == m)]["auroc"])
            row.append("n/a" if not math.isfinite(ci.mean) else f"{ci.mean * 100:.1f} ± {ci.half_width * 100:.1f}")
        med_rows.append(row)
    med_rows.append(["**mean over tasks**"] + [f"**{_fmt(med.get(m, float('nan')))}**" for m in ordered])
    parts += ["", "### MedIMeta protocol: AUROC x100 per task (mean ± 95% CI over episodes)", "",
              _md(["task"] + [label(m) for m in ordered], med_rows)]
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter test-time optimisation, fewer tasks and instances")
    parser.add_argument("--instances", type=int, default=None, help="episodes per (task, shot count) (default 10; quick 3)")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="L2L shot counts (default 3..10; quick 3 5)")
    parser.add_argument("--n-query", type=int, default=10, help="query images per class (10 as MedIMeta)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="DATASET/TASK",
                        help="tasks to run (default all 13; quick: the first task of each task kind)")
    parser.add_argument("--learners", nargs="+", default=None, help="registered names (default: every one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: $MEDMETA_NUM_THREADS, else this process's CPU share)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--work-dir", type=Path, default=None, help="episode lists and per-learner reports")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the learners already finished in --work-dir (same settings) instead of rerunning them")
    args = parser.parse_args(argv)
    apply_num_threads(args.threads)  # as the apps: --threads, else $MEDMETA_NUM_THREADS, else the CPU share
    instances = args.instances or (3 if args.quick else 10)
    shots = tuple(args.shots or ((3, 5) if args.quick else tuple(range(3, 11))))

    from medmeta.recipes import open_default

    meta = MetaDataset(open_default("real").root, channels=3, normalize="imagenet")
    entries = [e for e in meta.tasks if e.task_target.is_classification]
    if args.tasks:
        tasks = [tuple(t.split("/", 1)) for t in args.tasks]
    elif args.quick:
        first: dict[str, tuple[str, str]] = {}
        for e in entries:
            first.setdefault(e.task_target.value, e.key)
        tasks = list(first.values())
    else:
        tasks = [e.key for e in entries]
    tasks = [(str(d), str(t)) for d, t in tasks]

    common = dict(instances=instances, n_query=args.n_query, on_insufficient="skip", seed=0)
    l2l = l2l_protocol(shots=shots, metrics=("accuracy", "auroc"), **common)
    med = medimeta_protocol(**common)
    plan, left_out = learner_plan(args.learners, args.quick)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medmeta-learners-table-"))
    shared = same_episodes(meta, tasks, l2l, med)
    print(f"# {len(plan)} learners on {len(tasks)} tasks; work dir {work}; MedIMeta = L2L 5-shot episodes: {shared}",
          file=sys.stderr, flush=True)

    l2l_rows: list[pd.DataFrame] = []
    med_rows: list[pd.DataFrame] = []
    walls: dict[str, float] = {}
    counts: dict[str, int] = {}
    groups: dict[str, bool] = {}
    failed: dict[str, str] = {}
    skipped: list[Any] = []
    for name, overrides in plan.items():
        try:
            df, wall = run_learner(name, overrides, meta, tasks, l2l, work / "l2l", args.device, args.resume)
            count = len(df)
            if not shared:
                mdf, mwall = run_learner(name, overrides, meta, tasks, med, work / "medimeta", args.device, args.resume)
                med_rows.append(mdf)
                wall, count = wall + mwall, count + len(mdf)
        except Exception as err:  # a broken learner must not hide the others' results
            failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            traceback.print_exc()
            continue
        l2l_rows.append(df)
        walls[name], counts[name] = wall, count
        skipped = skipped or list(df.attrs.get("skipped") or [])
        groups[name] = bool(getattr(LEARNERS.get(name), "transductive", False))
        print(f"# {name}: {len(df)} episodes, {wall:.1f} s", file=sys.stderr, flush=True)
    if not l2l_rows:
        raise SystemExit("no learner produced results")
    l2l_df = pd.concat(l2l_rows, ignore_index=True)
    med_df = l2l_df[l2l_df["shots"] == 5] if shared else pd.concat(med_rows, ignore_index=True)
    l2l_df.to_csv(work / "l2l_results.csv", index=False)

    command = "python benchmarks/learners_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = [
        f"Command: `{command.strip()}` ({datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}).",
        f"Data: the embedded real-image set, tasks {', '.join(f'{d}/{t}' for d, t in tasks)}; backbone "
        f"{BACKBONE[0]} with offline ImageNet weights ({BACKBONE[1]}), frozen features through the feature cache "
        f"where the learner allows.",
        f"L2L: shots {list(shots)}, {instances} instances per shot count, {args.n_query} query images per class; "
        f"MedIMeta: 5 shots, {instances} instances" + (" (the same episodes as L2L's 5-shot ones)." if shared else "."),
        "Learners that need meta-training (ProtoNet, MAML family, FEAT, RelationNet, ...) are evaluated as they are "
        "at test time on ImageNet features, without meta-training.",
        "`T:` marks transductive learners (they use the unlabelled query set); they form their own group.",
    ]
    changed = {n: o for n, o in plan.items() if o and n in walls}
    if changed:
        notes.append("Shortened test-time optimisation (--quick): " + "; ".join(
            f"{n} " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in changed.items()) + ".")
    for name, why in {**left_out, **failed}.items():
        notes.append(f"Not in the table: `{name}`: {why}.")
    if skipped:
        notes.append(f"{len(skipped)} class/shot combination(s) without enough test images were skipped.")
    text = tables(l2l_df, med_df, walls, counts, groups) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
