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
# # 1. Quick start: the meta-dataset and its episodes
#
# Open a MedIMeta-format meta-dataset, list its datasets, tasks and domains, and draw few-shot
# episodes of every task kind (multi-class, binary, multi-label, ordinal), shown as image grids
# with their labels.
#
# **Switches** (first code cell): `MEDIMETA_ROOT` (env `MEDIMETA_ROOT`) points the notebook at
# the real MedIMeta download (one folder per dataset, each with `info.yaml`); left unset it uses
# the small real-image meta-dataset embedded in medmeta. `QUICK` (env `MEDMETA_NOTEBOOK_QUICK=1`,
# set by the test suite) draws fewer episodes. Figures are written as PNG to `OUT` (env
# `MEDMETA_NOTEBOOK_OUT`, default `notebooks/outputs/`).

# %%
import os
from pathlib import Path

MEDIMETA_ROOT = os.environ.get("MEDIMETA_ROOT")  # None: the embedded real-image mini meta-dataset
QUICK = os.environ.get("MEDMETA_NOTEBOOK_QUICK", "0") == "1"
OUT = os.environ.get("MEDMETA_NOTEBOOK_OUT") or ("outputs" if Path.cwd().name == "notebooks" else "notebooks/outputs")
OUT = Path(OUT) / "01_quickstart"
OUT.mkdir(parents=True, exist_ok=True)
print(f"quick mode: {QUICK}" + ("  (fewer episodes in the multi-domain stream)" if QUICK else ""))
print("figures go to", OUT.resolve())

# %%
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medmeta.data import MetaDataset
from medmeta.episodes import (
    FewShotSampler,
    MultiDomainSampler,
    VariableFewShotSampler,
    load_episode_list,
    save_episode_list,
)
from medmeta.tasks import TaskTarget

pd.set_option("display.width", 160)
pd.set_option("display.max_colwidth", 40)


def save(fig, name):
    """Save a figure as PNG beside the run and show it."""
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print("saved", path)
    plt.show()
    plt.close(fig)


# %% [markdown]
# ## Open the meta-dataset
# `MetaDataset(root)` reads every `info.yaml` under the root; `open_default("real")` opens the
# embedded mini meta-dataset of real medical images (built once into a local cache).

# %%
if MEDIMETA_ROOT:
    meta = MetaDataset(MEDIMETA_ROOT)
else:
    from medmeta.recipes import open_default

    meta = open_default("real")
print(meta)
print("datasets:", meta.dataset_ids)
print("domains: ", meta.domains)

# %%
summary = meta.summary()
summary[["dataset_id", "task_name", "domain", "target", "num_classes", "num_samples", "train", "val", "test",
         "input_size", "min_class_count"]]

# %% [markdown]
# Tasks per kind of target, and the classes of each task:

# %%
print(summary.groupby("target").size().rename("tasks").to_string(), "\n")
for entry in meta.tasks:
    classes = ", ".join(entry.description.classes[:8]) + (" ..." if entry.num_classes > 8 else "")
    print(f"{entry.dataset_id:>18} / {entry.task_name:<28} {entry.target:<27} [{classes}]")

# %% [markdown]
# ## One image of every dataset
# `meta.source(dataset_id, task_name, split=...)` opens one task of one dataset as a torch
# `Dataset`. `normalize=None` keeps pixel values in [0, 1] for display (training uses the
# official mean/std 0.5 normalisation, or `normalize="imagenet"`).

# %%
def show(ax, image, title=""):
    """Show a (C, H, W) image in [0, 1]."""
    image = image.clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


PER_ROW = 6
first_tasks = summary.drop_duplicates("dataset_id")
fig, axes = plt.subplots(len(first_tasks), PER_ROW, figsize=(1.9 * PER_ROW, 2.2 * len(first_tasks)), squeeze=False,
                         constrained_layout=True)
for row_axes, (_, row) in zip(axes, first_tasks.iterrows()):
    src = meta.source(row.dataset_id, row.task_name, split="train", normalize=None)
    # A few images spread over the split, labelled with the dataset's first task.
    positions = np.linspace(0, len(src) - 1, PER_ROW).astype(int)
    images = src.read_images(positions)
    for ax, pos, image in zip(row_axes, positions, images):
        label, d = src.labels[pos], src.description  # raw label keys as stored (label_keys -> classes)
        if np.ndim(label) == 0:
            name = dict(zip(d.label_keys, d.classes))[int(label)]
        else:  # multi-label: one 0/1 column per class
            name = ", ".join(c for c, v in zip(d.classes, label) if v) or "(none)"
        show(ax, image, textwrap.fill(name, 22))
    row_axes[0].text(-0.12, 0.5, f"{row.dataset_id}\n{row.domain}", transform=row_axes[0].transAxes,
                     rotation=90, va="center", ha="right", fontsize=8)
fig.suptitle(f"{len(first_tasks)} datasets, each row labelled with its first task", fontsize=10)
save(fig, "datasets_overview.png")

# %% [markdown]
# ## Episodes of each task kind
# `FewShotSampler(source, n_way, n_shot, n_query, seed)` draws episode `k` from
# `np.random.default_rng([seed, k])`, so any episode can be replayed. Labels follow one
# encoding: class positions for multi-class and ordinal tasks, one 0/1 column for binary tasks
# (K positives and K negatives), one 0/1 column per label for multi-label tasks (K positives and K
# negatives of every label, pruned to a minimal covering set, so support sizes vary).

# %%
def label_text(labels, description, i):
    """Readable label of item ``i`` of an episode."""
    target = description.task_target
    if target is TaskTarget.BINARY_CLASSIFICATION:
        return textwrap.fill(description.classes[int(labels[i, 0])], 20)
    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        on = [textwrap.shorten(description.classes[j], 24) for j in np.flatnonzero(labels[i].numpy() > 0.5)]
        return "\n".join(on) if on else "(none)"
    return textwrap.fill(description.classes[int(labels[i])], 20)


def episode_figure(episode, title, max_query=8):
    n_s = len(episode.support_images)
    n_q = min(len(episode.query_images), max_query)
    cols = max(n_s, n_q)
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 5.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n_s):
        show(axes[0, i], episode.support_images[i], label_text(episode.support_labels, episode.description, i))
    for i in range(n_q):
        show(axes[1, i], episode.query_images[i], label_text(episode.query_labels, episode.description, i))
    axes[0, 0].text(-0.15, 0.5, "support", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.15, 0.5, "query", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(title, fontsize=10)
    return fig


kinds = {
    TaskTarget.MULTICLASS_CLASSIFICATION: dict(n_way=3, n_shot=2, n_query=2),
    TaskTarget.BINARY_CLASSIFICATION: dict(n_shot=3, n_query=3),
    TaskTarget.MULTILABEL_CLASSIFICATION: dict(n_way=3, n_shot=1, n_query=1),
    TaskTarget.ORDINAL_REGRESSION: dict(n_shot=1, n_query=1),
}
drawn = {}
for target, settings in kinds.items():
    entries = [e for e in meta.tasks if e.task_target is target]
    if not entries:
        print(f"no {target.value} task in this meta-dataset")
        continue
    entry = max(entries, key=lambda e: min(e.class_counts.values()) if e.class_counts else 0)
    source = meta.source(entry.dataset_id, entry.task_name, split="train", normalize=None)
    if settings.get("n_way") and settings["n_way"] > entry.num_classes:
        settings = {**settings, "n_way": None}
    sampler = FewShotSampler(source, seed=0, on_insufficient="skip", **settings)
    spec = sampler.sample(0)
    episode = spec.materialize(source)
    drawn[target] = (source, sampler, spec)
    print(f"{target.value}: {entry.dataset_id}/{entry.task_name}  {spec.n_way}-way {spec.shots}-shot, "
          f"{episode.n_support} support / {episode.n_query} query images, labels {tuple(episode.support_labels.shape)} "
          f"{episode.support_labels.dtype}")
    fig = episode_figure(episode, f"{target.value}: {entry.dataset_id} / {entry.task_name} "
                                  f"({spec.n_way}-way, {spec.shots}-shot)")
    save(fig, f"episode_{target.value.lower()}.png")

# %% [markdown]
# ## Variable episodes, many domains, and frozen lists
# `VariableFewShotSampler` draws the way and shot of each episode (as in Meta-Dataset and the
# MedIMeta mm-MAML training); `MultiDomainSampler` picks a task per episode across datasets
# (uniformly, by size, or tempered). A frozen episode list stores episodes as JSON with hashes
# of the data, so an evaluation set can be shared and replayed exactly.

# %%
source, _, _ = drawn[TaskTarget.MULTICLASS_CLASSIFICATION] if TaskTarget.MULTICLASS_CLASSIFICATION in drawn else next(iter(drawn.values()))
variable = VariableFewShotSampler(source, way_range=(2, None), shot_range=(1, 4), n_query=2, seed=1,
                                  on_insufficient="skip")
print("variable episodes (way, shot):", [(s.n_way, s.shots) for s in variable.specs(8)])

stream = MultiDomainSampler(meta, weighting="uniform", n_shot=2, n_query=2, seed=0, on_insufficient="skip")
n_stream = 12 if QUICK else 40
picked = pd.Series([f"{s.dataset_id}/{s.task_name}" for s in stream.specs(n_stream)]).value_counts()
print(f"{n_stream} multi-domain episodes drew these tasks:\n{picked.to_string()}")

specs = variable.specs(5)
path = save_episode_list(OUT / "episodes.json", specs, seed=1, dataset_facts=[source])
replayed = load_episode_list(path, source)
assert all(a.same_as(b) for a, b in zip(specs, replayed))
print(f"{len(replayed)} episodes written to {path.name} and replayed identically")

# %%
print("figures:", sorted(p.name for p in OUT.glob("*.png")))
