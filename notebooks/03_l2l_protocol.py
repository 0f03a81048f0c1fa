# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. The L2L challenge protocol: accuracy against shots, rank then aggregate
#
# The MICCAI 2023 Learn2Learn (L2L) challenge scored few-shot methods on unseen medical tasks:
# for every test task, 100 episodes for each number of shots N = 3..10; a task's score is query
# accuracy averaged over N; methods are ranked per task and the ranks averaged, so no task
# weighs more than another whatever its scale.
#
# Here several learners on the same offline ImageNet MobileNetV2 run on exactly the same frozen
# episodes (`medmeta.evaluation.run_protocol` with `l2l_protocol()`):
#
# * **ProtoNet** (Snell et al. 2017): class means of the features, nearest prototype;
# * **ProtoNet, cosine**: the same with cosine similarity;
# * **linear probe**: a logistic-regression head on frozen features ("A Closer Look", Chen et al. 2019);
# * **fine-tune**: a new head and the whole backbone trained on the support set (Adam).
#
# **Switches** (first code cell): `MEDIMETA_ROOT` (env) points at the real MedIMeta root (left
# unset: the embedded real-image mini meta-dataset); `QUICK` (env `MEDMETA_NOTEBOOK_QUICK=1`,
# set by the tests) runs fewer tasks, shot counts and episodes and shorter fine-tuning; `INSTANCES`
# sets the episodes per shot count (the challenge used 100). Outputs (CSV, Markdown summary, PNG) go to
# `OUT` (env `MEDMETA_NOTEBOOK_OUT`, default `notebooks/outputs/`).

# %%
import os
from pathlib import Path

MEDIMETA_ROOT = os.environ.get("MEDIMETA_ROOT")  # None: the embedded real-image mini meta-dataset
QUICK = os.environ.get("MEDMETA_NOTEBOOK_QUICK", "0") == "1"
OUT = os.environ.get("MEDMETA_NOTEBOOK_OUT") or ("outputs" if Path.cwd().name == "notebooks" else "notebooks/outputs")
OUT = Path(OUT) / "03_l2l_protocol"
OUT.mkdir(parents=True, exist_ok=True)

INSTANCES = 2 if QUICK else 3         # episodes per (task, shot count); the challenge: 100
SHOTS = (3, 6, 10) if QUICK else tuple(range(3, 11))  # the challenge: 3..10
N_QUERY = 10 if MEDIMETA_ROOT else 5  # query images per class; the embedded test splits are small
MAX_TASKS = 2 if QUICK else None      # test tasks: the first task of each dataset (None: of every dataset)
FINETUNE_STEPS = 5 if QUICK else 10
print(f"quick mode: {QUICK}  ->  shots {SHOTS}, {INSTANCES} episodes per shot count, "
      f"first task of {MAX_TASKS or 'every'} dataset(s), {FINETUNE_STEPS} fine-tuning steps, {N_QUERY} query images per class")
print("outputs go to", OUT.resolve())

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from medmeta.backbones import create_backbone
from medmeta.data import MetaDataset
from medmeta.evaluation import (
    l2l_protocol,
    plot_scores_vs_shots,
    rank_then_aggregate,
    run_protocol,
    summarize,
    task_ranks,
)
from medmeta.learners import FineTune, LinearProbe, ProtoNet

pd.set_option("display.width", 160)
torch.manual_seed(0)


def save(fig, name):
    """Save a figure as PNG beside the run and show it."""
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print("saved", path)
    plt.show()
    plt.close(fig)


# %% [markdown]
# ## Data, protocol and learners
# The offline ImageNet weights expect ImageNet normalisation, so the meta-dataset is opened with
# `normalize="imagenet"` and 3 channels (grayscale images are repeated), as in the MedIMeta paper.

# %%
if MEDIMETA_ROOT:
    meta = MetaDataset(MEDIMETA_ROOT, channels=3, normalize="imagenet")
else:
    from medmeta.recipes import open_default

    meta = open_default("real")
    meta = MetaDataset(meta.root, channels=3, normalize="imagenet")
print(meta)

protocol = l2l_protocol(shots=SHOTS, instances=INSTANCES, n_query=N_QUERY, on_insufficient="skip")
print("protocol:", {k: v for k, v in protocol.to_dict().items() if k in ("shots", "instances", "n_query", "metrics", "aggregate")})

# Test tasks: the first task of each dataset (of the first MAX_TASKS datasets); pass tasks=None to
# run_protocol for every classification task. Classes whose test split cannot hold N shots + the
# query images are skipped for that N and reported.
first_task_of = {}
for entry in meta.tasks:
    first_task_of.setdefault(entry.dataset_id, entry.key)
tasks = list(first_task_of.values())[:MAX_TASKS]
print("test tasks:", tasks)


def backbone():
    return create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2")


learners = {
    "protonet": ProtoNet(backbone()),
    "protonet_cosine": ProtoNet(backbone(), distance="cosine"),
    "linear_probe": LinearProbe(backbone()),
    "finetune": FineTune(backbone(), steps=FINETUNE_STEPS, lr=1e-3),
}

# %% [markdown]
# ## Run the protocol
# Every learner sees the same episodes, written once as frozen lists under `OUT/l2l/episodes`
# (and read back, verified against the data, by later runs). Frozen-backbone learners are solved
# on cached features, so each image is embedded once per task.

# %%
df = run_protocol(learners, meta, tasks, protocol, out_dir=OUT / "l2l", progress=False)
print(f"{len(df)} rows: {df['method'].nunique()} methods x {df[['dataset', 'task']].drop_duplicates().shape[0]} tasks "
      f"x {df['shots'].nunique()} shot counts x {INSTANCES} episodes")
for item in df.attrs["skipped"]:
    print("skipped:", item)
df.head()

# %% [markdown]
# ## Accuracy against shots, per task
# Mean query accuracy with its 95% confidence interval (1.96 standard errors over episodes).

# %%
plot_path = plot_scores_vs_shots(df, "accuracy", OUT / "accuracy_vs_shots.png", scale=100,
                                 title="L2L protocol: accuracy against shots")
print("saved", plot_path)
per_shot = summarize(df, ["accuracy"], by=("method", "shots"))
per_shot.pivot(index="method", columns="shots", values="accuracy_mean").mul(100).round(1)

# %% [markdown]
# ## Rank then aggregate
# Each task's score is the accuracy averaged over N = 3..10; methods are ranked within each task
# (ties share the average rank) and the ranks averaged.

# %%
ranks = task_ranks(df, score="accuracy")
print(ranks.pivot(index="method", columns=["dataset", "task"], values="rank").to_string())
ranking = rank_then_aggregate(df, score="accuracy")
ranking.assign(mean_score=(ranking["mean_score"] * 100).round(2))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True,
                               gridspec_kw={"width_ratios": [1.4, 1]})
scores = ranks.pivot(index="method", columns=["dataset", "task"], values="accuracy") * 100
rank_grid = ranks.pivot(index="method", columns=["dataset", "task"], values="rank")
im = ax1.imshow(scores.values, cmap="viridis", aspect="auto")
ax1.set_yticks(range(len(scores.index)), scores.index)
ax1.set_xticks(range(scores.shape[1]), [f"{d}\n{t}" for d, t in scores.columns], fontsize=7, rotation=30, ha="right")
middle = np.nanmean(scores.values)
for i in range(scores.shape[0]):
    for j in range(scores.shape[1]):
        ax1.text(j, i, f"{scores.values[i, j]:.1f}\n(rank {rank_grid.values[i, j]:g})", ha="center", va="center",
                 fontsize=7, color="w" if scores.values[i, j] < middle else "k")
fig.colorbar(im, ax=ax1, label="accuracy x100, mean over N")
ax1.set_title("task scores and ranks")
ax2.barh(ranking["method"][::-1], ranking["mean_rank"][::-1], color="tab:blue")
ax2.set_xlabel("mean rank (1 = best)")
ax2.set_title("rank then aggregate")
ax2.grid(axis="x", alpha=0.3)
save(fig, "rank_then_aggregate.png")

# %%
print((OUT / "l2l" / "summary.md").read_text()[:2000])
print("figures:", sorted(p.name for p in OUT.glob("*.png")))
