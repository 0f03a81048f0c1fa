"""Images per second: random-index batch reads (one sorted h5py call) vs per-item reads.

Both paths return the same normalised float tensors (checked). The batch path is
``MedIMetaTaskSource.read_images``: one sorted fancy-index read per batch (through a memory map
of the contiguous dataset, or, second column, through an h5py selection), then the one image
pipeline (``medmeta.data.transforms.ImageTransform``) on the batch, chunk by chunk. The per-item path is what the official loader does for
each image: one h5py read, one ``PIL.Image.fromarray`` (+ channel conversion), then torchvision's
``ToTensor`` and ``Normalize``. With ``medimeta`` installed, the official loader itself is timed
too. The file is in the page cache after writing, so this measures CPU cost, not the disk.

    python benchmarks/bench_data_reads.py --quick
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from medmeta.data import MedIMetaTaskSource
from medmeta.data.writer import write_dataset


def make_dataset(root: Path, n: int, size: int, channels: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    info = {"id": f"bench_c{channels}", "name": f"Bench {channels}ch", "domain": "benchmark",
            "tasks": [{"task_name": "t", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "a", 1: "b"}}]}
    cut = int(0.8 * n)
    write_dataset(root, info, images, {"t": np.arange(n) % 2}, {"train": range(cut), "test": range(cut, n)})
    return root


def per_item(path: Path, indices: np.ndarray, channels: int, handle: dict) -> torch.Tensor:
    """One h5py read and one PIL conversion per image (the official loader's path)."""
    if "ds" not in handle:
        handle["ds"] = h5py.File(path, "r")["images"]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)])
    out = []
    for i in indices:
        image = Image.fromarray(handle["ds"][int(i), ...])
        if image.mode == "RGB" and channels == 1:
            image = image.convert("L")
        out.append(tf(image))
    return torch.stack(out)


def timed(fn, batches) -> tuple[float, list]:
    outs = []
    t0 = time.perf_counter()
    for b in batches:
        outs.append(fn(b))
    return time.perf_counter() - t0, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast run")
    p.add_argument("--images", type=int, default=None, help="images in the dataset")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=None)
    args = p.parse_args()
    n = args.images or (1000 if args.quick else 4000)
    size = args.size or (64 if args.quick else 224)
    n_batches = args.batches or (10 if args.quick else 30)
    try:
        import medimeta  # the official loader, optional
    except ImportError:
        medimeta = None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for channels in (3, 1):
            root = make_dataset(Path(tmp), n, size, channels)
            dataset_id = f"bench_c{channels}"
            src = MedIMetaTaskSource(root, dataset_id, "t")
            rng = np.random.default_rng(1)
            batches = [rng.choice(n, args.batch_size, replace=False) for _ in range(n_batches)]
            src.read_images(batches[0][:2])  # open the file outside the timing
            handle: dict = {}
            per_item(src.hdf5_path, batches[0][:2], channels, handle)
            t_batch, out_batch = timed(src.read_images, batches)
            t_item, out_item = timed(lambda b: per_item(src.hdf5_path, b, channels, handle), batches)
            via_h5py = MedIMetaTaskSource(root, dataset_id, "t", memory_map=False)
            via_h5py.read_images(batches[0][:2])
            t_h5py, out_h5py = timed(via_h5py.read_images, batches)
            for a, b, c in zip(out_batch, out_item, out_h5py):
                assert torch.equal(a, b) and torch.equal(a, c), "the paths disagree"
            images = n_batches * args.batch_size
            row = [f"{channels}x{size}x{size}", images / t_batch, images / t_h5py, images / t_item, None]
            if medimeta is not None:
                medimeta.MedIMeta._infos = None  # the official loader caches infos in a class attribute
                official = medimeta.MedIMeta(str(root), dataset_id, "t")
                t_off, out_off = timed(lambda b: torch.stack([official[int(i)][0] for i in b]), batches)
                for a, b in zip(out_batch, out_off):
                    assert torch.equal(a, b), "medmeta and the official loader disagree"
                row[4] = images / t_off
            rows.append(row)
            src.close()
            via_h5py.close()
            handle["ds"].file.close()

    print(f"# MedIMeta reads: {n} images in images.hdf5, random batches of {args.batch_size}, {n_batches} batches, "
          f"{torch.get_num_threads()} torch threads; identical output checked")
    print("| images | batch read, memory map (img/s) | batch read, h5py selection (img/s) | per item h5py+PIL (img/s) "
          "| official loader (img/s) | batch / per item |")
    print("|---|---|---|---|---|---|")
    for shape, fast, h5sel, slow, official in rows:
        off = f"{official:.0f}" if official is not None else "not installed"
        print(f"| {shape} | {fast:.0f} | {h5sel:.0f} | {slow:.0f} | {off} | {fast / slow:.2f}x |")


if __name__ == "__main__":
    main()
