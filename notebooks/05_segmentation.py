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
# # 5. Few-shot segmentation: heads, episodes, Dice and NSD
#
# A walk-through of `medmeta.adapters.segmentation` (install with `pip install 'medmeta[seg]'`)
# on real images that installed packages ship (nothing is downloaded):
#
# 1. **nuclei**: stardist's fluorescence microscopy image with its ground-truth nuclei mask
#    (2018 Data Science Bowl), cut into tiles and stored as a 2-D segmentation set in the
#    MedIMeta layout (`masks` beside `images` in `images.hdf5`);
# 2. **brain tissue**: the MNI152 T1 template (nilearn) with grey / white matter labels from
#    its probability maps, as slices of a volume with a 2 mm voxel spacing.
#
# Three heads on the same frozen ImageNet MobileNetV2 features, each adapted on a few annotated
# support images (`create_segmenter(name, backbone).adapt(support_images, support_masks,
# num_labels)`): masked-average **prototypes** (PANet), a **linear** probe on hypercolumns, and a
# small **U-Net** decoder fine-tuned on the support set. Scores: Dice and the normalised surface
# Dice (NSD, Nikolov et al. 2021) at a tolerance in millimetres, using the voxel spacing.
#
# **Switches** (first code cell): `QUICK` (env `MEDMETA_NOTEBOOK_QUICK=1`, set by the tests) uses
# fewer episodes and a shorter U-Net fine-tuning; `SHOTS` the annotated support images per
# episode. Figures go to `OUT` (env `MEDMETA_NOTEBOOK_OUT`, default `notebooks/outputs/`). For
# your own CT volumes see `VolumeSliceSource.from_files` and the FLARE runner (`medmeta-flare`).

# %%
import os
from pathlib import Path

QUICK = os.environ.get("MEDMETA_NOTEBOOK_QUICK", "0") == "1"
OUT = os.environ.get("MEDMETA_NOTEBOOK_OUT") or ("outputs" if Path.cwd().name == "notebooks" else "notebooks/outputs")
OUT = Path(OUT) / "05_segmentation"
OUT.mkdir(parents=True, exist_ok=True)

SHOTS = 2                          # annotated support images per episode
EPISODES = 2 if QUICK else 5       # episodes per dataset and head
QUERIES = 3 if QUICK else 6        # query images per episode
UNET_STEPS = 15 if QUICK else 100  # fine-tuning steps of the U-Net decoder
print(f"quick mode: {QUICK}  ->  {EPISODES} episodes x {QUERIES} queries, U-Net {UNET_STEPS} steps")
print("figures go to", OUT.resolve())

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from medmeta.adapters.segmentation import (
    SegmentationEpisodeSampler,
    SegmentationTaskSource,
    VolumeSliceSource,
    create_segmenter,
    list_segmenters,
    mni152_volume,
    nuclei_2d,
    segmentation_scores,
    tile_image,
    write_segmentation_set,
)
from medmeta.adapters.segmentation.heads import predict_masks
from medmeta.adapters.segmentation.real_data import MNI152_LABELS
from medmeta.backbones import create_backbone

torch.manual_seed(0)
pd.set_option("display.width", 160)


def save(fig, name):
    """Save a figure as PNG beside the run and show it."""
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print("saved", path)
    plt.show()
    plt.close(fig)


# %% [markdown]
# ## Data
# The nuclei image (512 x 512) is cut into 128 px tiles and written as a segmentation set; the
# MNI152 volume (downsampled to 2 mm) becomes a slice source whose items keep their volume and
# slice index.

# %%
image, nuclei = nuclei_2d(binary=True)
tiles, tile_masks = tile_image(image, nuclei, size=128)
nuclei_dir = write_segmentation_set(
    OUT / "data" / "nuclei", (tiles * 255).round().astype(np.uint8), tile_masks, labels={1: "nucleus"},
    dataset_id="stardist_nuclei", domain="Fluorescence microscopy",
    summary="stardist's img2d.tif / mask2d.tif cut into 128 px tiles",
)
nuclei_source = SegmentationTaskSource(nuclei_dir)
print(nuclei_source.description)
print(f"{len(nuclei_source)} tiles, nuclei cover {100 * tile_masks.mean():.1f}% of the pixels")

t1, tissue, spacing = mni152_volume(downsample=2)
brain_source = VolumeSliceSource([t1], [tissue], labels={1: MNI152_LABELS[1], 2: MNI152_LABELS[2]},
                                 spacings=[spacing], axis=2, window=None, names=["MNI152"],
                                 dataset_id="mni152", domain="Brain MRI")
print(brain_source.description)
print(f"volume {t1.shape} at {spacing} mm -> {len(brain_source)} axial slices")

# %% [markdown]
# ## Heads and episodes
# The backbone exposes dense feature maps (`out_indices`) at strides 4, 8 and 16; grayscale
# images are repeated to its 3 input channels. `SegmentationEpisodeSampler` draws seeded episodes
# of `SHOTS` annotated support images and query images that contain the labels.

# %%
backbone = create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2", out_indices=(1, 2, 3))
print("segmenters:", list_segmenters(), "| feature channels", backbone.feature_channels,
      "strides", backbone.feature_reductions)
heads = {
    "prototype": create_segmenter("prototype", backbone),
    "linear": create_segmenter("linear", backbone),
    "unet": create_segmenter("unet", backbone, finetune_steps=UNET_STEPS),
}

tasks = {
    "nuclei": (nuclei_source, {1: "nucleus"}, (1.0, 1.0), 2.0),     # pixel spacing, NSD tolerance 2 px
    "brain": (brain_source, {1: "grey", 2: "white"}, spacing[:2], 2.0),  # 2 mm slices, tolerance 2 mm
}
rows, examples = [], {}
for task_name, (source, labels, pixel_spacing, tolerance) in tasks.items():
    sampler = SegmentationEpisodeSampler(source, n_support=SHOTS, n_query=QUERIES, seed=0)
    for e in range(EPISODES):
        episode = sampler.episode(e)
        num_labels = len(labels)
        for head_name, head in heads.items():
            torch.manual_seed(e)
            logits = head.adapt(episode.support_images, episode.support_labels, num_labels)(episode.query_images)
            pred = predict_masks(logits)
            for q in range(len(pred)):
                scores = segmentation_scores(pred[q], episode.query_labels[q], spacing=pixel_spacing, labels=labels,
                                             tolerance_mm=tolerance, hd95=False)
                rows.append({"task": task_name, "head": head_name, "episode": e, "query": q, **scores})
            if e == 0:
                examples[(task_name, head_name)] = (episode, pred)
scores = pd.DataFrame(rows)
table = scores.groupby(["task", "head"])[["dice_mean", "nsd_mean"]].agg(["mean", "std"]).round(3)
table

# %% [markdown]
# ## Predicted masks over the query images
# Ground truth outlined in white, the prediction filled in colour; each panel's title gives its
# Dice and NSD.

# %%
colours = np.array([[0, 0, 0, 0], [1.0, 0.2, 0.2, 0.45], [0.2, 0.5, 1.0, 0.45]])
for task_name, (source, labels, pixel_spacing, tolerance) in tasks.items():
    n_show = min(3, QUERIES)
    fig, axes = plt.subplots(n_show, 1 + len(heads), figsize=(3.0 * (1 + len(heads)), 3.0 * n_show), squeeze=False)
    for q in range(n_show):
        episode, _ = examples[(task_name, "prototype")]
        img = episode.query_images[q, 0].numpy()
        gt = episode.query_labels[q].numpy()
        axes[q, 0].imshow(img, cmap="gray")
        axes[q, 0].imshow(colours[gt])
        axes[q, 0].set_title("ground truth", fontsize=9)
        for j, head_name in enumerate(heads, start=1):
            _, pred = examples[(task_name, head_name)]
            p = pred[q].numpy()
            s = segmentation_scores(p, gt, spacing=pixel_spacing, labels=labels, tolerance_mm=tolerance, hd95=False)
            axes[q, j].imshow(img, cmap="gray")
            axes[q, j].imshow(colours[p])
            for lab in labels:
                axes[q, j].contour(gt == lab, levels=[0.5], colors="w", linewidths=0.7)
            axes[q, j].set_title(f"{head_name}: Dice {s['dice_mean']:.2f}, NSD {s['nsd_mean']:.2f}", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{task_name}: {SHOTS}-shot, labels {list(labels.values())}"
                 + (" (red: grey matter, blue: white matter)" if task_name == "brain" else ""), fontsize=10)
    save(fig, f"segmentation_{task_name}.png")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
summary = scores.groupby(["task", "head"])[["dice_mean", "nsd_mean"]].agg(["mean", "sem"])
for ax, metric in zip(axes, ["dice_mean", "nsd_mean"]):
    width = 0.8 / len(heads)
    for j, head_name in enumerate(heads):
        sub = summary.xs(head_name, level="head")
        x = np.arange(len(sub)) + (j - (len(heads) - 1) / 2) * width
        ax.bar(x, sub[(metric, "mean")], width, yerr=1.96 * sub[(metric, "sem")].fillna(0), capsize=3, label=head_name)
    ax.set_xticks(np.arange(len(sub)), sub.index)
    ax.set_ylim(0, 1)
    ax.set_title(metric.replace("_mean", "").upper() + " (mean over labels, 95% CI)")
    ax.grid(axis="y", alpha=0.3)
axes[0].legend()
save(fig, "segmentation_scores.png")

# %%
print("figures:", sorted(p.name for p in OUT.glob("*.png")))
