"""Tile a slide at a physical scale, store the grid, and read tiles in parallel workers.

``tile_slide`` turns "224 px tiles at 1 micron per pixel" (or at 10x, or at a level) into a
pyramid level and a read size: a stored level within ``scale_tolerance`` of the requested scale
is read 1:1; otherwise the next finer level is read at a larger size and resized to
``tile_size``. Upsampling is refused: a scale finer than level 0 raises
:class:`~medmeta.adapters.slides.errors.ScaleUnavailableError`.

Snapping (``snap_to_tiles=True``): when a read fits in one stored tile (``read_size`` at most
the stored tile edge, no overlap), tiles are laid out inside the stored tiles, ``tw //
read_size`` per stored tile per axis, so each read decodes exactly one stored tile (2-4x faster
than a read that straddles 2 or 4 tiles). When ``read_size`` does not divide the stored tile
this leaves strips between tiles unsampled (e.g. 224 in 256: 12.5% per axis); pass
``snap_to_tiles=False`` for a dense grid. Larger reads start on the stored grid.

Coordinates are stored like CLAM's: HDF5 dataset ``coords`` (N, 2) int32 level-0 x, y with
attributes ``patch_level`` and ``patch_size`` (the read size at that level), plus the output
``tile_size`` and the slide fingerprint so a grid cannot be applied to the wrong slide.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medmeta.adapters.slides.backends.base import SlideReader, slide_fingerprint
from medmeta.adapters.slides.errors import (
    FingerprintMismatchError,
    NoTissueError,
    ScaleUnavailableError,
    SlideError,
)
from medmeta.adapters.slides.tissue import TissueMask, detect_tissue
from medmeta.io import atomic_path

__all__ = [
    "TileGrid",
    "tile_slide",
    "resolve_downsample",
    "TileDataset",
    "read_tile",
    "tile_to_tensor",
    "TileTransform",
]

log = logging.getLogger(__name__)

#: Objective power equivalent to 1 micron per pixel when a slide states only its mpp
#: (the usual convention: 20x ~ 0.5 um/px, 40x ~ 0.25 um/px).
MPP_TIMES_MAGNIFICATION = 10.0


@dataclass
class TileGrid:
    """Tiles of one slide: level-0 top-left corners and how to read them.

    Attributes:
        coords: ``(N, 2)`` int64 level-0 ``(x, y)``.
        level: pyramid level read.
        read_size: square region read at ``level`` (pixels), resized to ``tile_size``.
        tile_size: output tile edge (pixels).
        mpp: microns per output pixel (``None`` when the slide has no mpp).
        slide_fingerprint: :func:`slide_fingerprint` of the slide the grid belongs to.
        level_downsample: downsample of ``level``.
        tissue: tissue fraction of each tile (when a mask was used).
        aligned: every read lies inside one stored tile or starts on the stored tile grid.
    """

    coords: np.ndarray
    level: int
    read_size: int
    tile_size: int
    mpp: Optional[float]
    slide_fingerprint: str
    level_downsample: float = 1.0
    overlap: int = 0
    tissue: Optional[np.ndarray] = None
    aligned: bool = False
    magnification: Optional[float] = None
    slide_path: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return int(len(self.coords))

    @property
    def footprint(self) -> float:
        """Level-0 edge of one tile."""
        return self.read_size * self.level_downsample

    def params(self) -> dict[str, Any]:
        """The tiling parameters (a cache key for features computed from this grid)."""
        return {
            "level": int(self.level),
            "read_size": int(self.read_size),
            "tile_size": int(self.tile_size),
            "overlap": int(self.overlap),
            "mpp": None if self.mpp is None else round(float(self.mpp), 6),
            "n_tiles": len(self),
            "coords_hash": _hash_coords(self.coords),
        }

    def subset(self, indices: "Sequence[int] | np.ndarray") -> "TileGrid":
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            coords=self.coords[idx],
            tissue=None if self.tissue is None else self.tissue[idx],
            attrs=dict(self.attrs),
        )

    def sample(self, n: int, seed: int = 0) -> "TileGrid":
        """At most ``n`` tiles drawn without replacement (kept in grid order), seeded."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), size=int(n), replace=False)))

    # ---- storage -----------------------------------------------------------------------
    def save_h5(self, path: "str | Path") -> Path:
        """Write ``coords`` (int32) with CLAM-style attributes and the fingerprint; atomic."""
        import h5py

        path = Path(path)
        if len(self) and int(self.coords.max()) >= 2**31:
            raise ValueError(f"tile grid: coordinates exceed int32 and cannot be stored in {path}")
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=self.coords.astype(np.int32))
                ds.attrs["patch_level"] = int(self.level)
                ds.attrs["patch_size"] = int(self.read_size)
                ds.attrs["tile_size"] = int(self.tile_size)
                ds.attrs["level_downsample"] = float(self.level_downsample)
                ds.attrs["overlap"] = int(self.overlap)
                ds.attrs["mpp"] = float("nan") if self.mpp is None else float(self.mpp)
                ds.attrs["magnification"] = float("nan") if self.magnification is None else float(self.magnification)
                ds.attrs["aligned"] = bool(self.aligned)
                ds.attrs["slide_fingerprint"] = self.slide_fingerprint
                ds.attrs["slide_path"] = self.slide_path
                for key, value in f["coords"].attrs.items():
                    f.attrs[key] = value
                if self.tissue is not None:
                    f.create_dataset("tissue", data=np.asarray(self.tissue, dtype=np.float32))
        return path

    @classmethod
    def load_h5(cls, path: "str | Path", slide: "SlideReader | str | Path | None" = None) -> "TileGrid":
        """Read a grid written by :meth:`save_h5` (or CLAM); with ``slide``, check it is that slide."""
        import h5py

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tile grid {path} does not exist")
        try:
            with h5py.File(path, "r") as f:
                if "coords" not in f:
                    raise ValueError(f"tile grid {path}: no 'coords' dataset (expected CLAM-style coordinates)")
                dset = f["coords"]
                attrs = {**dict(f.attrs), **dict(dset.attrs)}
                coords = np.asarray(dset[...], dtype=np.int64)
                tissue = np.asarray(f["tissue"][...]) if "tissue" in f else None
        except OSError as err:
            raise ValueError(f"tile grid {path}: not a readable HDF5 file ({err})") from err
        for key in ("patch_level", "patch_size"):
            if key not in attrs:
                raise ValueError(f"tile grid {path}: attribute {key!r} missing from 'coords'")

        def opt_float(key: str) -> Optional[float]:
            v = attrs.get(key)
            return None if v is None or not np.isfinite(float(v)) else float(v)

        fingerprint = _as_str(attrs.get("slide_fingerprint", ""))
        if slide is not None:
            actual = slide.fingerprint if isinstance(slide, SlideReader) else slide_fingerprint(slide)
            if not fingerprint:
                warnings.warn(f"tile grid {path} has no slide fingerprint; cannot check it belongs to {slide}")
            elif fingerprint != actual:
                name = slide.path if isinstance(slide, SlideReader) else slide
                raise FingerprintMismatchError(
                    f"tile grid {path} was made for slide fingerprint {fingerprint}, but {name} has "
                    f"fingerprint {actual}: a different (or changed) slide file"
                )
        level = int(attrs["patch_level"])
        read_size = int(attrs["patch_size"])
        level_ds = opt_float("level_downsample")
        if level_ds is None:
            level_ds = (
                float(slide.level_downsamples[level]) if isinstance(slide, SlideReader) else 2.0**level
            )
        return cls(
            coords=coords,
            level=level,
            read_size=read_size,
            tile_size=int(attrs.get("tile_size", read_size)),
            mpp=opt_float("mpp"),
            slide_fingerprint=fingerprint,
            level_downsample=level_ds,
            overlap=int(attrs.get("overlap", 0)),
            tissue=tissue,
            aligned=bool(attrs.get("aligned", False)),
            magnification=opt_float("magnification"),
            slide_path=_as_str(attrs.get("slide_path", "")),
        )


def _as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _hash_coords(coords: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes()).hexdigest()[:16]


def resolve_downsample(
    slide: SlideReader,
    mpp: Optional[float] = None,
    magnification: Optional[float] = None,
    level: Optional[int] = None,
) -> float:
    """The level-0 downsample that gives the requested scale (at most one of the three)."""
    given = [name for name, v in (("mpp", mpp), ("magnification", magnification), ("level", level)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"tile_slide: give at most one of mpp, magnification, level (got {', '.join(given)})")
    if level is not None:
        return float(slide.level_downsamples[slide._check_level(level)])
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"tile_slide: mpp must be positive, got {mpp}")
        if slide.mpp is None:
            raise ScaleUnavailableError(
                f"slide {slide.path}: its metadata give no microns per pixel, so mpp={mpp} cannot be "
                f"resolved; pass level= (or magnification= if the objective power is known)"
            )
        return float(mpp) / float(np.mean(slide.mpp))
    if magnification is not None:
        if not magnification > 0:
            raise ValueError(f"tile_slide: magnification must be positive, got {magnification}")
        base = slide.magnification
        if base is None:
            if slide.mpp is None:
                raise ScaleUnavailableError(
                    f"slide {slide.path}: neither objective power nor microns per pixel are in its "
                    f"metadata, so magnification={magnification} cannot be resolved; pass level="
                )
            base = MPP_TIMES_MAGNIFICATION / float(np.mean(slide.mpp))
            log.info(
                "slide has no objective power; assuming %.3g x from its mpp (%.3g um/px ~ %gx at 1 um/px)",
                base, float(np.mean(slide.mpp)), MPP_TIMES_MAGNIFICATION,
            )
        return float(base) / float(magnification)
    return 1.0


def _choose_level(slide: SlideReader, target_ds: float, tile_size: int, tolerance: float, what: str) -> tuple[int, int]:
    """(level, read_size): a stored level within ``tolerance`` is read 1:1, else the next finer."""
    if target_ds < 1.0 - tolerance:
        mag = f"{slide.magnification:g}x" if slide.magnification else "unknown power"
        mpp = f"{np.mean(slide.mpp):.4g} um/px" if slide.mpp else "unknown mpp"
        raise ScaleUnavailableError(
            f"slide {slide.path}: {what} is finer than level 0 ({mpp}, {mag}) by a factor "
            f"{1 / target_ds:.3g}; the slide cannot give it (no upsampling)"
        )
    for lvl, ds in enumerate(slide.level_downsamples):
        if abs(ds - target_ds) <= tolerance * target_ds:
            return lvl, tile_size
    lvl = slide.best_level_for_downsample(max(target_ds, 1.0))
    read = int(round(tile_size * max(target_ds, 1.0) / slide.level_downsamples[lvl]))
    return lvl, max(1, read)


def _positions(length: int, read: int, stride: int, stored: Optional[int], snap: bool) -> tuple[np.ndarray, bool]:
    """Level-pixel starts of reads of ``read`` pixels along an axis of ``length`` pixels."""
    if length < read:
        return np.zeros(0, dtype=np.int64), False
    if snap and stored and read <= stored and stride == read:
        k = stored // read
        starts = (np.arange(0, length, stored)[:, None] + np.arange(k)[None, :] * read).ravel()
        return starts[starts + read <= length].astype(np.int64), True
    starts = np.arange(0, length - read + 1, stride, dtype=np.int64)
    aligned = bool(snap and stored and stride % stored == 0)
    return starts, aligned


def tile_slide(
    slide: "SlideReader | str | Path",
    tile_size: int = 224,
    mpp: Optional[float] = None,
    magnification: Optional[float] = None,
    level: Optional[int] = None,
    overlap: int = 0,
    min_tissue: float = 0.5,
    tissue_mask: Optional[TissueMask] = None,
    snap_to_tiles: bool = True,
    scale_tolerance: float = 0.05,
    backend: str = "auto",
) -> TileGrid:
    """A grid of ``tile_size`` tiles at the requested scale, kept where tissue covers ``min_tissue``.

    Args:
        slide: a reader or a path (opened with ``backend``).
        tile_size: output tile edge in pixels.
        mpp / magnification / level: the scale (at most one; none means level 0).
        overlap: output pixels shared by neighbouring tiles (0 <= overlap < tile_size).
        min_tissue: minimum tissue fraction of a tile (0 keeps every tile and skips detection).
        tissue_mask: a precomputed mask (default: :func:`detect_tissue` with its defaults).
        snap_to_tiles: lay reads inside / on the stored tile grid (see module doc).
        scale_tolerance: relative difference under which a stored level counts as the scale.

    Raises:
        ScaleUnavailableError: the scale is finer than level 0 or cannot be resolved.
        NoTissueError: no tissue, or no tile reaches ``min_tissue``.
    """
    if not isinstance(slide, SlideReader):
        from medmeta.adapters.slides.reader import open_slide

        slide = open_slide(slide, backend=backend)
    tile_size = int(tile_size)
    if tile_size <= 0:
        raise ValueError(f"tile_slide: tile_size must be positive, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile_slide: overlap must be in [0, tile_size), got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"tile_slide: min_tissue must be in [0, 1], got {min_tissue}")
    what = (
        f"mpp={mpp}" if mpp is not None else f"magnification={magnification}" if magnification is not None
        else f"level={level}" if level is not None else "level 0"
    )
    target_ds = resolve_downsample(slide, mpp=mpp, magnification=magnification, level=level)
    if level is not None:
        lvl, read = int(level), tile_size
    else:
        lvl, read = _choose_level(slide, target_ds, tile_size, scale_tolerance, what)
    level_ds = float(slide.level_downsamples[lvl])
    stride = max(1, int(round((tile_size - overlap) * read / tile_size)))
    lw, lh = slide.level_dimensions[lvl]
    stored = slide.tile_size[lvl] if lvl < len(slide.tile_size) else None
    xs, ax = _positions(lw, read, stride, stored[0] if stored else None, snap_to_tiles)
    ys, ay = _positions(lh, read, stride, stored[1] if stored else None, snap_to_tiles)
    if len(xs) == 0 or len(ys) == 0:
        raise SlideError(
            f"slide {slide.path}: level {lvl} is {lw}x{lh} pixels, smaller than one tile read of "
            f"{read}x{read} ({what}, tile_size={tile_size})"
        )
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    level_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    coords = np.ceil(level_xy * level_ds - 1e-6).astype(np.int64)
    out_mpp = None if slide.mpp is None else float(np.mean(slide.mpp)) * level_ds * read / tile_size
    out_mag = None
    if slide.magnification is not None:
        out_mag = slide.magnification / (level_ds * read / tile_size)
    tissue = None
    if min_tissue > 0:
        mask = tissue_mask if tissue_mask is not None else detect_tissue(slide)
        if tuple(mask.slide_dimensions) != tuple(slide.dimensions):
            raise ValueError(
                f"tile_slide: tissue mask is for a {mask.slide_dimensions} slide, but {slide.path} is "
                f"{slide.dimensions}"
            )
        if mask.is_empty:
            raise NoTissueError(
                f"slide {slide.path}: no tissue detected (method={mask.method}, threshold="
                f"{mask.threshold:.3g}); try method='otsu', a lower threshold, or min_tissue=0"
            )
        tissue = mask.fractions(coords, read * level_ds)
        keep = tissue >= min_tissue
        if not keep.any():
            raise NoTissueError(
                f"slide {slide.path}: none of {len(coords)} tiles has a tissue fraction >= {min_tissue} "
                f"(best {tissue.max():.2f}); lower min_tissue"
            )
        coords, tissue = coords[keep], tissue[keep]
    return TileGrid(
        coords=coords,
        level=lvl,
        read_size=read,
        tile_size=tile_size,
        mpp=out_mpp,
        slide_fingerprint=slide.fingerprint,
        level_downsample=level_ds,
        overlap=int(overlap),
        tissue=None if tissue is None else tissue.astype(np.float32),
        aligned=bool(ax and ay),
        magnification=out_mag,
        slide_path=str(slide.path),
    )


def read_tile(slide: SlideReader, grid: TileGrid, index: int) -> np.ndarray:
    """Tile ``index`` of ``grid`` as RGB uint8 ``(tile_size, tile_size, 3)``."""
    x, y = (int(v) for v in grid.coords[index])
    region = slide.read_region((x, y), grid.level, (grid.read_size, grid.read_size))
    if grid.read_size != grid.tile_size:
        region = np.array(
            Image.fromarray(region).resize((grid.tile_size, grid.tile_size), Image.Resampling.BILINEAR)
        )
    return region


def tile_to_tensor(tile: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` to float ``(3, H, W)`` in [-1, 1], the scaling ``ArrayTaskSource`` uses."""
    t = torch.from_numpy(np.require(tile, requirements=["C", "W"])).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


class TileTransform:
    """uint8 RGB tile -> normalised float tensor, with optional stain normalisation first.

    ``mean`` / ``std`` are per channel on the [0, 1] scale (default 0.5 / 0.5: values in
    [-1, 1]; ImageNet backbones want ``IMAGENET_MEAN`` / ``IMAGENET_STD``). Picklable, and its
    ``repr`` names everything that changes the output (used in feature cache keys).
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        stain: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"TileTransform: mean and std need 3 values, std > 0; got {mean}, {std}")
        self.stain = stain

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        if self.stain is not None:
            tile = self.stain(tile)
        t = torch.from_numpy(np.require(tile, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (t - mean) / std

    def __repr__(self) -> str:
        return f"TileTransform(mean={self.mean}, std={self.std}, stain={self.stain!r})"


class TileDataset(Dataset):
    """The tiles of one slide as a torch Dataset of ``(image, (x, y))``.

    The slide is opened lazily in each process that reads (one reader per DataLoader worker,
    reopened after a fork), and the dataset pickles as its path, so ``num_workers > 0`` reads
    tiles in parallel. ``transform`` receives the RGB uint8 ``(H, W, 3)`` tile and returns a
    tensor (default: :func:`tile_to_tensor`); a transform returning a uint8 array is followed by
    the default conversion.
    """

    def __init__(
        self,
        slide_path: "str | Path",
        grid: TileGrid,
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        backend: str = "auto",
        check_fingerprint: bool = True,
        **reader_options: Any,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.grid = grid
        self.transform = transform
        self.backend = backend
        self.reader_options = reader_options
        self._reader: Optional[SlideReader] = None
        self._pid = -1
        if check_fingerprint and grid.slide_fingerprint:
            actual = slide_fingerprint(self.slide_path)
            if actual != grid.slide_fingerprint:
                raise FingerprintMismatchError(
                    f"TileDataset: grid fingerprint {grid.slide_fingerprint} does not match slide "
                    f"{self.slide_path} ({actual})"
                )

    @property
    def reader(self) -> SlideReader:
        if self._reader is None or self._pid != os.getpid():
            from medmeta.adapters.slides.reader import open_slide

            self._reader = open_slide(self.slide_path, backend=self.backend, **self.reader_options)
            self._pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_pid"] = -1
        return state

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        tile = read_tile(self.reader, self.grid, int(index))
        if self.transform is not None:
            out = self.transform(tile)
            if isinstance(out, np.ndarray):
                out = tile_to_tensor(out) if out.dtype == np.uint8 else torch.from_numpy(out)
        else:
            out = tile_to_tensor(tile)
        return out, torch.from_numpy(self.grid.coords[int(index)].copy())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
