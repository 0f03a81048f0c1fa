"""Datasets written BY HAND in the official MedIMeta layout (h5py, numpy, yaml, PIL; no medmeta
writer), so a writer bug cannot hide a reader bug. Pixel values follow a formula, so tests can
compute the expected value of any pixel without reading a file.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import yaml
from PIL import Image

ORDINAL_KEYS = [1, 4, 6, 8, 10]  # DeepDRiD's "Clarity" keys: gaps


def rgb_pixels(n: int, h: int, w: int) -> np.ndarray:
    """``img[i, y, x, c] = (17 i + 5 y + 3 x + 50 c) % 256``."""
    i, y, x, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((17 * i + 5 * y + 3 * x + 50 * c) % 256).astype(np.uint8)


def gray_pixels(n: int, h: int, w: int) -> np.ndarray:
    """``img[i, y, x] = (11 i + 7 y + 2 x) % 256``."""
    i, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return ((11 * i + 7 * y + 2 * x) % 256).astype(np.uint8)


def split_text(indices) -> str:
    return "\n".join(f"images/{i:06d}.tiff" for i in indices)


def write_by_hand(folder: Path, info: dict, images: np.ndarray, labels: dict, splits: dict, original: dict,
                  tiffs: bool = True) -> Path:
    """One dataset folder in the official layout, written with the raw libraries."""
    folder.mkdir(parents=True)
    (folder / "info.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    with h5py.File(folder / "images.hdf5", "w") as f:
        f.create_dataset("images", data=images)
    if tiffs:
        (folder / "images").mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / "images" / f"{i:06d}.tiff")
    (folder / "task_labels").mkdir()
    for name, y in labels.items():
        np.save(folder / "task_labels" / f"{name}.npy", np.asarray(y))
    for sub, parts in (("splits", splits), ("original_splits", original)):
        (folder / sub).mkdir()
        for name, idx in parts.items():
            if len(idx):
                (folder / sub / f"{name}.txt").write_text(split_text(idx))
    return folder


def _info(id_, name, domain, tasks, input_size, n, splits, original, **extra):
    counts = {k: len(splits.get(k, [])) for k in ("train", "val", "test")}
    ocounts = {k: len(original.get(k, [])) for k in ("train", "val", "test")}
    info = {"id": id_, "name": name, "summary": "hand-written test data", "domain": domain, "tasks": tasks,
            "input_size": list(input_size), "total_num_samples": n, "splits_num_samples": counts,
            "original_splits_num_samples": ocounts, "domain_overlaps": [], "subject_overlaps": [], "license": "CC0"}
    info.update(extra)
    return info


HAND_RGB_LABELS = {
    "organ": np.arange(12) % 3,
    "malignant": (np.arange(12) // 2) % 2,
    "Field definition": np.asarray([ORDINAL_KEYS[i % 5] for i in range(12)]),
    "findings": np.asarray([[(i >> b) & 1 for b in range(3)] for i in range(12)]),
}
HAND_RGB_SPLITS = {"train": [5, 0, 3, 1, 7, 2, 6, 4], "val": [9, 8], "test": [10, 11]}  # unsorted on purpose
HAND_RGB_ORIGINAL = {"train": list(range(10)), "test": [10, 11]}  # no val file, val: 0


def build_hand_root(root: Path) -> Path:
    """Four hand-written datasets (see the module doc and each block below)."""
    # A: RGB, non-square 6x5, one task of each kind (binary stored (N,), ordinal keys with gaps,
    #    a task name with a space), TIFFs, unsorted split file, original splits without val.
    tasks = [
        {"task_name": "organ", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "liver", 1: "lung", 2: "bone"}},
        {"task_name": "malignant", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "benign", 1: "malignant"}},
        {"task_name": "Field definition", "task_target": "ORDINAL_REGRESSION",
         "labels": {k: f"level {k}" for k in ORDINAL_KEYS}},
        {"task_name": "findings", "task_target": "MULTILABEL_CLASSIFICATION", "labels": {0: "a", 1: "b", 2: "c"}},
    ]
    write_by_hand(
        root / "hand_rgb",
        _info("hand_rgb", "Hand RGB", "Domain A", tasks, (3, 6, 5), 12, HAND_RGB_SPLITS, HAND_RGB_ORIGINAL,
              domain_overlaps=["hand_gray"], subject_overlaps=["hand_gray_as_rgb", "renamed_elsewhere"]),
        rgb_pixels(12, 6, 5), HAND_RGB_LABELS, HAND_RGB_SPLITS, HAND_RGB_ORIGINAL,
    )
    # B: grayscale 7x7, stored (N, H, W).
    splits = {"train": list(range(6)), "val": [6, 7], "test": [8, 9]}
    write_by_hand(
        root / "hand_gray",
        _info("hand_gray", "Hand Gray", "Domain B", [
            {"task_name": "grade", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "low", 1: "high"}}],
            (1, 7, 7), 10, splits, splits, domain_overlaps=["hand_rgb"]),
        gray_pixels(10, 7, 7), {"grade": np.arange(10) % 2}, splits, splits,
    )
    # C: grayscale stored, input_size says 3 channels: the official loader converts to RGB.
    splits = {"train": [0, 1, 2, 3], "test": [4, 5]}
    write_by_hand(
        root / "hand_gray_as_rgb",
        _info("hand_gray_as_rgb", "Hand Gray as RGB", "Domain B", [
            {"task_name": "grade", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "no", 1: "yes"}}],
            (3, 4, 4), 6, splits, splits),
        gray_pixels(6, 4, 4), {"grade": np.arange(6) % 2}, splits, splits,
    )
    # D: RGB stored at 8x10, input_size [1, 4, 5]: converted to gray, then resized; the folder
    #    name differs from the id. Image 0 has a pure red pixel at (0, 0): PIL's L of it is 76.
    images = rgb_pixels(6, 8, 10)
    images[0, 0, 0] = (255, 0, 0)
    splits = {"train": [0, 1, 2, 3], "test": [4, 5]}
    write_by_hand(
        root / "rgb_to_gray_folder",
        _info("hand_rgb_as_gray", "Hand RGB as Gray", "Domain C", [
            {"task_name": "kind", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {3: "x", 7: "y"}}],
            (1, 4, 5), 6, splits, splits),
        images, {"kind": np.asarray([3, 7, 3, 7, 3, 7])}, splits, splits,
    )
    return root


def reference_item(dataset_dir: Path, index: int, channels: int, size: tuple[int, int], tiff: bool = False) -> np.ndarray:
    """A per-item reader written from the format spec: (C, H, W) float32, official normalisation."""
    if tiff:
        image = Image.open(dataset_dir / "images" / f"{index:06d}.tiff")
        image.load()
    else:
        with h5py.File(dataset_dir / "images.hdf5", "r") as f:
            image = Image.fromarray(f["images"][index])
    if image.mode == "RGB" and channels == 1:
        image = image.convert("L")
    elif image.mode == "L" and channels == 3:
        image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return (array - 0.5) / 0.5
