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
# # 2. The MedIMeta paper baselines: IM-PT, mm-PT and mm-MAML
#
# Woerner et al. ("A comprehensive and easy-to-use multi-domain multi-task medical imaging
# meta-dataset", 2024) compare, for each target dataset held out from training:
#
# * **IM-PT**: an ImageNet-pretrained backbone fine-tuned directly on each target task's support
#   set (a new head, Adam, 50 steps, lr 1e-3);
# * **mm-PT**: supervised multi-domain multi-task pre-training (one head per training task on a
#   shared backbone, mixed batches, early stopping on validation AUROC), then the same fine-tuning;
# * **mm-MAML**: cross-domain MAML on random tasks of every training dataset (random way, 1-10
#   shots, 10 query images per class; inner SGD lr 0.1, 4 steps in training, 32 at test).
#
# Training excludes the target and every dataset that overlaps with it (`domain_overlaps`,
# `subject_overlaps` in `info.yaml`). Testing follows the paper's protocol: presampled 5-shot
# tasks with 10 query images per class, mean AUROC x 100 with a 95% confidence interval.
# All three start from the same offline ImageNet MobileNetV2 (`imagenet-mobilenetv2`; the paper
# used ResNet-18/50: `backbone=resnet18 backbone.pretrained=/path/to/weights.pth`).
#
# The runs go through the library's own experiment configs (`conf/experiment/im_pt.yaml`,
# `mm_pt.yaml`, `mm_maml.yaml`) and `medmeta.training.run_training`, exactly as
# `medmeta-train experiment=mm_maml ...` would run them.
#
# **Switches** (first code cell): `MEDIMETA_ROOT` (env) points at the real MedIMeta root (left
# unset: the embedded real-image mini meta-dataset); `TARGET` the held-out dataset; `QUICK` (env
# `MEDMETA_NOTEBOOK_QUICK=1`, set by the tests) trains for a few steps and tests on a few
# episodes: its numbers show that the pipeline runs, not the baselines' quality. Outputs go to
# `OUT` (env `MEDMETA_NOTEBOOK_OUT`, default `notebooks/outputs/`).

# %%
import os
from pathlib import Path

MEDIMETA_ROOT = os.environ.get("MEDIMETA_ROOT")  # None: the embedded real-image mini meta-dataset
TARGET = os.environ.get("MEDMETA_TARGET")         # None: the dataset chosen below
QUICK = os.environ.get("MEDMETA_NOTEBOOK_QUICK", "0") == "1"
OUT = os.environ.get("MEDMETA_NOTEBOOK_OUT") or ("outputs" if Path.cwd().name == "notebooks" else "notebooks/outputs")
OUT = Path(OUT) / "02_medimeta_baselines"
OUT.mkdir(parents=True, exist_ok=True)

if QUICK:  # a smoke run: a few training steps, a few test episodes
    INSTANCES, FINETUNE_STEPS = 2, 3
    MM_PT = ["trainer.steps=4", "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.batch_size=16",
             "trainer.val_max_items=16"]
    MM_MAML = ["trainer.steps=2", "trainer.val_every=1", "trainer.checkpoint_every=1", "trainer.meta_batch_size=1",
               "trainer.val_episodes=1", "learner.inner_steps=1", "learner.eval_inner_steps=2",
               "sampler.shot_range=[1,3]", "sampler.n_query=3"]
else:  # laptop scale; the paper: 100 test episodes, early stopping with patience 5 / 10
    INSTANCES, FINETUNE_STEPS = 5, 50
    MM_PT = ["trainer.steps=60", "trainer.val_every=20", "trainer.checkpoint_every=20", "trainer.batch_size=32",
             "trainer.val_max_items=128", "trainer.patience=3"]
    MM_MAML = ["trainer.steps=15", "trainer.val_every=5", "trainer.checkpoint_every=5", "trainer.meta_batch_size=2",
               "trainer.val_episodes=4", "learner.eval_inner_steps=16", "sampler.shot_range=[1,5]",
               "sampler.n_query=5", "trainer.patience=3"]
print(f"quick mode: {QUICK}  ->  {INSTANCES} test episodes per task, fine-tuning {FINETUNE_STEPS} steps; "
      f"mm-PT {MM_PT[0]}, mm-MAML {MM_MAML[0]}")
print("outputs go to", OUT.resolve())

# %%
import matplotlib.pyplot as plt
import pandas as pd
from hydra import compose, initialize_config_dir

from medmeta.cli import config_dir
from medmeta.data import MetaDataset
from medmeta.evaluation import summarize
from medmeta.training.run import run_training

pd.set_option("display.width", 160)


def save(fig, name):
    """Save a figure as PNG beside the run and show it."""
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print("saved", path)
    plt.show()
    plt.close(fig)


# %% [markdown]
# ## The meta-dataset and the held-out target
# The target's tasks are the test tasks; training uses the other datasets minus the target's
# overlaps (`MetaDataset.held_out`).

# %%
if MEDIMETA_ROOT:
    meta = MetaDataset(MEDIMETA_ROOT)
    DATA = ["data=medimeta", f"data.root={MEDIMETA_ROOT}"]
else:
    from medmeta.recipes import open_default

    meta = open_default("real")
    DATA = ["data=real_mini"]
summary = meta.summary()
if TARGET is None:  # the dataset with the largest test split
    TARGET = summary.sort_values(["test", "dataset_id"], ascending=[False, True]).iloc[0]["dataset_id"]
training = meta.held_out(TARGET)
print(f"target: {TARGET}; left out of training: {list(training.left_out)}")
print(f"training datasets: {training.dataset_ids} ({len(training.tasks)} tasks)")
summary[summary["dataset_id"] == TARGET][["dataset_id", "task_name", "target", "num_classes", "test", "min_class_count"]]

# %% [markdown]
# ## The three baselines
# Every run writes its folder under `OUT/runs/<baseline>`: the resolved config, metrics,
# checkpoints (best and last) and `test/` with the protocol's results, summary and episodes.
# The same test episodes are used by all three (frozen lists, same protocol seed).

# %%
COMMON = [
    *DATA, f"data.target={TARGET}",
    "backbone=mobilenetv2", "backbone.pretrained=imagenet-mobilenetv2",
    "protocol=medimeta", f"protocol.instances={INSTANCES}", "protocol.on_insufficient=skip",
    f"protocol.episode_dir={OUT / 'episodes'}",
    "trainer.device=auto", "trainer.progress=false", "logger=csv", "trainer.resume=false",
]
RUNS = {
    "IM-PT": ["experiment=im_pt", f"learner.steps={FINETUNE_STEPS}"],
    "mm-PT": ["experiment=mm_pt", f"test_learner.steps={FINETUNE_STEPS}", *MM_PT],
    "mm-MAML": ["experiment=mm_maml", *MM_MAML],
}

finals, frames = {}, []
for baseline, overrides in RUNS.items():
    run_dir = OUT / "runs" / baseline
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *COMMON, f"run_dir={run_dir}"])
    print(f"\n=== {baseline}: learner={cfg.learner.name}, {cfg.trainer.steps} training steps")
    finals[baseline] = run_training(cfg)
    frames.append(pd.read_csv(run_dir / "test" / "results.csv").assign(method=baseline))
results = pd.concat(frames, ignore_index=True)
for baseline, final in finals.items():
    print(f"{baseline:8} steps done: {final['steps_done']:4}  best validation {final['monitor']}: {final['best_metric']}")

# %% [markdown]
# ## Results: AUROC x 100 with 95% confidence intervals
# One row per target task, one column per baseline (mean ± 1.96 standard errors over the test
# episodes).

# %%
table = summarize(results, ["auroc", "accuracy"])
table["auroc"] = [f"{100 * m:.1f} ± {100 * h:.1f}" for m, h in zip(table["auroc_mean"], table["auroc_ci"])]
wide = table.pivot(index=["dataset", "task"], columns="method", values="auroc")[list(RUNS)]
wide.to_csv(OUT / "auroc_table.csv")
print(f"AUROC x100, {TARGET} held out, 5-shot, {INSTANCES} episodes per task")
wide

# %%
tasks = table[["dataset", "task"]].drop_duplicates().values.tolist()
fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 4.0), squeeze=False, sharey=True,
                         constrained_layout=True)
colours = dict(zip(RUNS, ["tab:gray", "tab:blue", "tab:orange"]))
for ax, (dataset, task) in zip(axes[0], tasks):
    rows = table[(table["dataset"] == dataset) & (table["task"] == task)].set_index("method").loc[list(RUNS)]
    bars = ax.bar(rows.index, 100 * rows["auroc_mean"], yerr=100 * rows["auroc_ci"].fillna(0), capsize=4,
                  color=[colours[m] for m in rows.index])
    ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in rows["auroc_mean"]], label_type="center", color="w", fontsize=8)
    ax.axhline(50, color="k", lw=0.8, ls="--", zorder=0)  # chance
    ax.set_title(f"{dataset}\n{task}", fontsize=9)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
axes[0, 0].set_ylabel("AUROC x100 (95% CI)")
fig.suptitle(f"MedIMeta protocol, 5-shot: target {TARGET}" + ("  [quick smoke run]" if QUICK else ""))
save(fig, "auroc_per_task.png")

# %%
print("figures:", sorted(p.name for p in OUT.glob("*.png")))
