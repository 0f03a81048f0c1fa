"""Tiles per second reading a large synthetic slide: medmeta's backends through ``TileDataset``
and DataLoader workers, against plain OpenSlide ``read_region`` per tile in one process (the
obvious alternative) and raw decoding of the covering stored tiles (the ceiling), same run.

Two read patterns at level 0: ``random`` (tiles at random pixel positions: each read covers up
to four stored tiles) and ``aligned`` (tiles on the stored tile grid: one stored tile per read).

    python benchmarks/bench_slides.py --quick
    python benchmarks/bench_slides.py --size 16384 --tiles 2000 --workers 0 2 4
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader


def _as_uint8_tensor(tile: np.ndarray) -> torch.Tensor:
    """Keep tiles as uint8 (no float conversion), so the table measures reading and decoding."""
    return torch.from_numpy(np.ascontiguousarray(tile))


def _coords(pattern: str, n: int, size: int, slide_w: int, slide_h: int, stored: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if pattern == "random":
        return np.stack([rng.integers(0, slide_w - size, n), rng.integers(0, slide_h - size, n)], 1)
    cols, rows = (slide_w - size) // stored + 1, (slide_h - size) // stored + 1
    cells = rng.choice(cols * rows, size=min(n, cols * rows), replace=False)
    return np.stack([(cells % cols) * stored, (cells // cols) * stored], 1)


def _timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def plain_openslide(path: Path, coords: np.ndarray, size: int) -> int:
    """What a user writes first: ``OpenSlide.read_region`` per tile, RGBA -> RGB array."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))
    slide.close()
    return len(coords)


def raw_decode(path: Path, coords: np.ndarray, size: int) -> int:
    """The ceiling: read and decode only the stored level-0 tiles each request covers (no assembly)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        th, tw = page.tilelength, page.tilewidth
        across = math.ceil(page.imagewidth / tw)
        offsets, counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables
        decode = page.decode
        fd = os.open(path, os.O_RDONLY)
        try:
            for x, y in coords:
                for ty in range(int(y) // th, (int(y) + size - 1) // th + 1):
                    for tx in range(int(x) // tw, (int(x) + size - 1) // tw + 1):
                        idx = ty * across + tx
                        decode(os.pread(fd, int(counts[idx]), int(offsets[idx])), idx, jpegtables=tables)
        finally:
            os.close(fd)
    return len(coords)


def medmeta_backend(path: Path, coords: np.ndarray, size: int, backend: str, workers: int, batch: int,
                    cache_bytes: int = 0) -> int:
    """medmeta's ``TileDataset`` (one reader per worker) through a DataLoader; tile caches off by
    default so that repeated stored tiles do not flatter the backends against the ceiling."""
    from medmeta.adapters.slides.tiling import TileDataset, TileGrid

    grid = TileGrid(coords=coords, level=0, read_size=size, tile_size=size, mpp=None, slide_fingerprint="")
    options = {} if backend in ("cucim", "kfb") else {"cache_bytes": cache_bytes}
    dataset = TileDataset(path, grid, transform=_as_uint8_tensor, backend=backend, check_fingerprint=False, **options)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
    n = 0
    for images, _ in loader:
        n += len(images)
    dataset.close()
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6144^2 slide, 300 tiles per row, workers 0 and 2")
    parser.add_argument("--size", type=int, default=12288, help="level-0 edge of the synthetic slide")
    parser.add_argument("--tile", type=int, default=256, help="requested tile edge (level-0 pixels)")
    parser.add_argument("--stored-tile", type=int, default=256, help="edge of the tiles stored in the TIFF")
    parser.add_argument("--tiles", type=int, default=1500, help="tiles read per row of the table")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every installed one but kfb")
    parser.add_argument("--compression", default="jpeg", choices=("jpeg", "zlib"))
    parser.add_argument("--slide", default=None, help="an existing level-0-tiled TIFF/SVS to read instead")
    parser.add_argument("--cache-mb", type=int, default=0, help="decoded-tile cache per medmeta reader (MiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.tiles, args.workers = 6144, 300, [0, 2]
    torch.set_num_threads(1)

    from medmeta.adapters.slides.reader import available_backends, open_slide
    from medmeta.adapters.slides.synthetic import make_synthetic_slide

    tmp = tempfile.TemporaryDirectory(prefix="bench_slides_")
    if args.slide:
        path = Path(args.slide)
    else:
        path = Path(tmp.name) / f"synthetic_{args.size}.tif"
        t0 = time.perf_counter()
        make_synthetic_slide(path, size=(args.size, args.size), seed=args.seed, blobs=6, tile=args.stored_tile,
                             compression=args.compression)
        print(f"# wrote {args.size}x{args.size} {args.compression} slide ({path.stat().st_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t0:.1f} s")
    path.read_bytes()  # warm the page cache so every row reads from memory
    ref = open_slide(path)
    w, h = ref.dimensions
    stored = ref.tile_size[0][0] if ref.tile_size and ref.tile_size[0] else args.stored_tile
    backends = args.backends or [b for b in available_backends() if b != "kfb"]
    print(f"# slide {path.name}: {w}x{h}, {ref.level_count} levels, stored tiles {stored}; "
          f"{args.tiles} tiles of {args.tile} px per row; {os.cpu_count()} CPUs; backends {backends}; "
          f"medmeta tile caches {args.cache_mb} MiB, plain OpenSlide default cache")

    rows = []
    for pattern in ("random", "aligned"):
        coords = _coords(pattern, args.tiles, args.tile, w, h, stored, args.seed)
        base = {}
        for name, fn in (("plain openslide read_region", lambda: plain_openslide(path, coords, args.tile)),
                         ("raw stored-tile decoding", lambda: raw_decode(path, coords, args.tile))):
            n, s = _timed(fn)
            base[name] = n / s
            rows.append((pattern, name, "-", 0, n, s, n / s))
        for backend in backends:
            for workers in args.workers:
                try:
                    n, s = _timed(lambda: medmeta_backend(path, coords, args.tile, backend, workers, 32,
                                                               args.cache_mb << 20))
                except Exception as err:  # an optional backend that fails here is reported, not fatal
                    print(f"# {backend} (workers {workers}) failed: {type(err).__name__}: {str(err)[:120]}")
                    continue
                rows.append((pattern, "medmeta TileDataset", backend, workers, n, s, n / s))
        for r in rows:
            if r[0] == pattern:
                r_list = list(r)
                rows[rows.index(r)] = (*r_list, r[6] / base["plain openslide read_region"],
                                       r[6] / base["raw stored-tile decoding"])

    header = f"{'pattern':8s} {'method':28s} {'backend':10s} {'workers':>7s} {'tiles':>6s} {'sec':>7s} " \
             f"{'tiles/s':>8s} {'x plain OS':>10s} {'x ceiling':>9s}"
    print(header)
    print("-" * len(header))
    for pattern, method, backend, workers, n, s, rate, vs_os, vs_raw in rows:
        print(f"{pattern:8s} {method:28s} {backend:10s} {workers:7d} {n:6d} {s:7.2f} {rate:8.0f} {vs_os:10.2f} {vs_raw:9.2f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
