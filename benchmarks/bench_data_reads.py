"""Images per second: random-index batch reads of MedIMeta files vs per-item reads, and HDF5 layouts.

Table 1 (per image size and channel count). Every path returns the same normalised float tensors
(checked bit for bit):

* batch read into a preallocated buffer: ``MedIMetaTaskSource.read_images(idx, out=buf)`` with
  one ``buf`` reused for every batch (what a loop over batches does; no fresh memory to page in);
* batch read: the same call returning a new tensor each time;
* batch read through an h5py selection (``memory_map=False``) instead of the memory map;
* per item: what the official loader does per image: one h5py read, ``PIL.Image.fromarray``
  (+ channel conversion), torchvision's ``ToTensor`` and ``Normalize``, then ``torch.stack``;
* the official ``medimeta`` loader itself, when installed.

Table 2 (skip with ``--no-layouts``): random batches of compressible images (8 px blocks plus
noise) from ``images.hdf5`` written contiguously
(MedIMeta's layout and medmeta's writer), chunked one image per chunk, and chunked with gzip,
through medmeta's batch read and the per-item path; plus the file sizes.

Paths run in alternating rounds (every path once per round, ``--rounds`` rounds) and the median
round is reported, so load from other jobs hits every path alike. The files are in the page cache
after writing: this measures CPU cost, not the disk.

    python benchmarks/bench_data_reads.py --quick
    python benchmarks/bench_data_reads.py            # 64 and 224 px, more images and rounds
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from medmeta.data import MedIMetaTaskSource
from medmeta.data.writer import write_dataset


def make_dataset(root: Path, n: int, size: int, channels: int, seed: int = 0, smooth: bool = False) -> Path:
    """Random images; ``smooth``: 8 px blocks plus a little noise (compressible, like real images)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    if smooth:
        low = rng.integers(0, 248, (n, -(-size // 8), -(-size // 8), *shape[3:]), dtype=np.uint8)
        blocks = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)[:, :size, :size]
        images = blocks + rng.integers(0, 8, shape, dtype=np.uint8)
    info = {"id": f"bench_c{channels}", "name": f"Bench {channels}ch", "domain": "benchmark",
            "tasks": [{"task_name": "t", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "a", 1: "b"}}]}
    cut = int(0.8 * n)
    write_dataset(root, info, images, {"t": np.arange(n) % 2}, {"train": range(cut), "test": range(cut, n)})
    return root


class PerItem:
    """One h5py read and one PIL conversion per image (the official loader's path)."""

    def __init__(self, path: Path, channels: int) -> None:
        self.file = h5py.File(path, "r")
        self.ds = self.file["images"]
        self.channels = channels
        self.tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)])

    def __call__(self, indices: np.ndarray) -> torch.Tensor:
        out = []
        for i in indices:
            image = Image.fromarray(self.ds[int(i), ...])
            if image.mode == "RGB" and self.channels == 1:
                image = image.convert("L")
            out.append(self.tf(image))
        return torch.stack(out)

    def close(self) -> None:
        self.file.close()


def rounds(paths: dict[str, Callable[[np.ndarray], torch.Tensor]], batches: list, n_rounds: int) -> tuple[dict, dict]:
    """Images/s of each path (median of alternating rounds; ``<name>:cpu`` by process CPU time,
    steadier than the wall clock on a loaded machine) and its outputs of the last round."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    outs: dict[str, list] = {}
    for _ in range(n_rounds):
        for name, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                fn(b)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name, fn in paths.items():  # outputs to compare, outside the timing (a copy of a reused buffer)
        outs[name] = [fn(batches[0]).clone()]
    images = sum(len(b) for b in batches)
    speed = {name: images / statistics.median(t) for name, t in times.items()}
    speed.update({f"{name}:cpu": images / max(statistics.median(t), 1e-9) for name, t in cpu.items()})
    return speed, outs


def reads_table(tmp: Path, n: int, size: int, batch_size: int, n_batches: int, n_rounds: int, medimeta: Any) -> list:
    rows = []
    for channels in (3, 1):
        root = make_dataset(tmp / f"reads_{size}_{channels}", n, size, channels)
        dataset_id = f"bench_c{channels}"
        src = MedIMetaTaskSource(root, dataset_id, "t")
        via_h5py = MedIMetaTaskSource(root, dataset_id, "t", memory_map=False)
        rng = np.random.default_rng(1)
        batches = [rng.choice(n, batch_size, replace=False) for _ in range(n_batches)]
        buffer = torch.empty((batch_size, channels, size, size))
        item = PerItem(src.hdf5_path, channels)
        paths: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
            "buffer": lambda b: src.read_images(b, out=buffer),
            "batch": src.read_images,
            "h5py": via_h5py.read_images,
            "item": item,
        }
        if medimeta is not None:
            medimeta.MedIMeta._infos = None  # the official loader caches infos in a class attribute
            official = medimeta.MedIMeta(str(root), dataset_id, "t")
            paths["official"] = lambda b: torch.stack([official[int(i)][0] for i in b])
        for fn in paths.values():
            fn(batches[0])  # open files, warm up
        speed, outs = rounds(paths, batches, n_rounds)
        first = outs["item"][0]
        for name, out in outs.items():
            assert torch.equal(out[0], first), f"{name} and the per-item path disagree"
        rows.append((f"{channels}x{size}x{size}", speed))
        src.close()
        via_h5py.close()
        item.close()
    return rows


def layouts_table(tmp: Path, n: int, size: int, batch_size: int, n_batches: int, n_rounds: int) -> list:
    """Contiguous vs chunked (one image per chunk) vs chunked + gzip, RGB."""
    base = make_dataset(tmp / f"layout_{size}", n, size, 3, smooth=True) / "bench_c3"
    with h5py.File(base / "images.hdf5", "r") as f:
        images = f["images"][...]
    variants: dict[str, dict[str, Any]] = {"contiguous (MedIMeta, medmeta writer)": {}, "chunked, 1 image per chunk": {"chunks": (1, *images.shape[1:])},
                "chunked + gzip level 4": {"chunks": (1, *images.shape[1:]), "compression": "gzip", "compression_opts": 4}}
    rng = np.random.default_rng(2)
    batches = [rng.choice(n, batch_size, replace=False) for _ in range(n_batches)]
    rows: list[tuple[str, float, bool, float, float]] = []
    for label, options in variants.items():
        folder = tmp / f"layout_{size}_{len(rows)}"
        shutil.copytree(base, folder)
        if options:
            (folder / "images.hdf5").unlink()
            with h5py.File(folder / "images.hdf5", "w") as f:
                f.create_dataset("images", data=images, **options)
        src = MedIMetaTaskSource(folder, "bench_c3", "t")
        item = PerItem(folder / "images.hdf5", 3)
        buffer = torch.empty((batch_size, 3, size, size))
        paths: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
            "buffer": lambda b: src.read_images(b, out=buffer), "item": item}
        for fn in paths.values():
            fn(batches[0])
        speed, outs = rounds(paths, batches, n_rounds)
        assert torch.equal(outs["buffer"][0], outs["item"][0])
        mapped = isinstance(src._images(), np.ndarray)
        rows.append((label, (folder / "images.hdf5").stat().st_size / 2**20, mapped, speed["buffer"], speed["item"]))
        src.close()
        item.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast run")
    p.add_argument("--sizes", default="64,224", help="image sides in pixels, comma-separated")
    p.add_argument("--images", type=int, default=None, help="images per dataset (default: by size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-layouts", dest="layouts", action="store_false", help="skip the HDF5 layout table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    n_batches = args.batches or (4 if args.quick else 10)
    n_rounds = args.rounds or (3 if args.quick else 5)
    try:
        import medimeta  # the official loader, optional
    except ImportError:
        medimeta = None

    def n_images(size: int) -> int:
        return args.images or max(args.batch_size * 2, (2000 if size <= 64 else 400) // (2 if args.quick else 1))

    table, layouts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            table += reads_table(Path(tmp), n_images(size), size, args.batch_size, n_batches, n_rounds, medimeta)
        if args.layouts:
            for size in sizes:
                layouts += [(size, *row) for row in layouts_table(Path(tmp), n_images(size), size, args.batch_size,
                                                                   n_batches, n_rounds)]

    print(f"# MedIMeta reads: random batches of {args.batch_size}, {n_batches} batches x median of {n_rounds} "
          f"alternating rounds, {torch.get_num_threads()} torch threads; identical output checked")
    print("| images | batch read into a reused buffer (img/s) | batch read, new tensor (img/s) | batch read, h5py "
          "selection (img/s) | per item h5py+PIL (img/s) | official loader (img/s) | buffer / per item "
          "| new tensor / per item | buffer / per item, CPU time | new tensor / per item, CPU time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, s in table:
        off = f"{s['official']:.0f}" if "official" in s else "not installed"
        print(f"| {shape} | {s['buffer']:.0f} | {s['batch']:.0f} | {s['h5py']:.0f} | {s['item']:.0f} | {off} "
              f"| {s['buffer'] / s['item']:.2f}x | {s['batch'] / s['item']:.2f}x | {s['buffer:cpu'] / s['item:cpu']:.2f}x "
              f"| {s['batch:cpu'] / s['item:cpu']:.2f}x |")
    if layouts:
        print()
        print("# HDF5 layout of images.hdf5 (RGB): medmeta batch read (reused buffer) and per-item read")
        print("| px | layout | file MiB | memory-mapped | batch read (img/s) | per item (img/s) | batch vs contiguous |")
        print("|---|---|---|---|---|---|---|")
        ref: Optional[float] = None
        for size, label, mib, mapped, batch, per_item in layouts:
            ref = batch if label.startswith("contiguous") else ref
            print(f"| {size} | {label} | {mib:.1f} | {'yes' if mapped else 'no'} | {batch:.0f} | {per_item:.0f} "
                  f"| {batch / (ref or batch):.2f}x |")


if __name__ == "__main__":
    main()
