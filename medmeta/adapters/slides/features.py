"""Embed the tiles of a slide once with a backbone and cache the features per slide.

A cache file is HDF5 with ``features`` (N, D) float32 and ``coords`` (N, 2) int32 (level-0
x, y, CLAM's layout), written atomically. Its name is a key over everything that changes the
features: the slide fingerprint, the backbone name and a digest of its weights, the tiling
parameters and the transform's identity, so a changed slide, backbone, weights, tiling or
normalisation never reuses stale features.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medmeta.adapters.slides.backends.base import slide_fingerprint
from medmeta.adapters.slides.errors import FingerprintMismatchError
from medmeta.adapters.slides.tiling import TileDataset, TileGrid, tile_slide
from medmeta.evaluation.feature_cache import weights_fingerprint
from medmeta.io import atomic_path
from medmeta.modes import module_mode

__all__ = [
    "SlideFeatures",
    "SlideFeatureStore",
    "backbone_digest",
    "embed_tiles",
    "embed_slide",
    "slide_features",
]

log = logging.getLogger(__name__)


backbone_digest = weights_fingerprint
"""The hash of a backbone's weights and buffers in a slide cache key: the protocols' feature
cache fingerprint (:func:`medmeta.evaluation.feature_cache.weights_fingerprint`), one for both."""


def _backbone_name(model: nn.Module) -> str:
    return str(getattr(model, "name", type(model).__name__))


@dataclass
class SlideFeatures:
    """Cached tile features of one slide."""

    features: Optional[np.ndarray]  # (N, D) float32; None when only the cache file is kept
    coords: np.ndarray  # (N, 2) int64 level-0 x, y
    slide_fingerprint: str
    backbone: str
    key: str
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def __len__(self) -> int:
        return int(len(self.coords))

    def tensor(self) -> torch.Tensor:
        if self.features is None:
            if self.path is None:
                raise ValueError("SlideFeatures: features were dropped and there is no cache file")
            return read_features(self.path).tensor()
        return torch.from_numpy(np.asarray(self.features, dtype=np.float32))


class SlideFeatureStore:
    """A folder of per-slide tile feature files, ``<root>/<fingerprint>/<key>.h5`` (on disk, shared
    by runs; not :class:`medmeta.evaluation.FeatureCache`, the in-memory embeddings of one protocol run)."""

    def __init__(self, root: "str | Path") -> None:
        self.root = Path(root)

    @staticmethod
    def make_key(fingerprint: str, backbone: str, weights: str, params: dict[str, Any], transform_id: str) -> str:
        blob = json.dumps(
            {"slide": fingerprint, "backbone": backbone, "weights": weights, "params": params, "transform": transform_id},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, fingerprint: str, key: str) -> Path:
        return self.root / fingerprint / f"{key}.h5"

    def load(self, fingerprint: str, key: str) -> Optional[SlideFeatures]:
        path = self.path(fingerprint, key)
        if not path.is_file():
            return None
        try:
            return read_features(path, expected_fingerprint=fingerprint)
        except ValueError as err:  # a damaged file: recompute and replace it
            log.warning("feature cache %s unreadable (%s); recomputing", path, err)
            return None

    def write(self, feats: SlideFeatures) -> Path:
        path = self.path(feats.slide_fingerprint, feats.key)
        write_features(path, feats)
        feats.path = path
        return path


def write_features(path: "str | Path", feats: SlideFeatures) -> Path:
    """Atomic HDF5 write of ``features`` and ``coords`` with their attributes."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(feats.features, dtype=np.float32))
            c = f.create_dataset("coords", data=np.asarray(feats.coords, dtype=np.int32).reshape(-1, 2))
            for key, value in feats.attrs.items():
                c.attrs[key] = value
            f.attrs["slide_fingerprint"] = feats.slide_fingerprint
            f.attrs["backbone"] = feats.backbone
            f.attrs["key"] = feats.key
    return path


def read_features(path: "str | Path", expected_fingerprint: Optional[str] = None) -> SlideFeatures:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", "coords"):
                if name not in f:
                    raise ValueError(f"feature file {path}: dataset {name!r} missing")
            features = np.asarray(f["features"][...], dtype=np.float32)
            coords = np.asarray(f["coords"][...], dtype=np.int64)
            attrs = dict(f["coords"].attrs)
            fingerprint = str(f.attrs.get("slide_fingerprint", ""))
            backbone = str(f.attrs.get("backbone", ""))
            key = str(f.attrs.get("key", ""))
    except OSError as err:
        raise ValueError(f"feature file {path}: not a readable HDF5 file ({err})") from err
    if len(features) != len(coords):
        raise ValueError(f"feature file {path}: {len(features)} feature rows for {len(coords)} coordinates")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise FingerprintMismatchError(
            f"feature file {path} holds features of slide {fingerprint}, expected {expected_fingerprint}"
        )
    return SlideFeatures(features, coords, fingerprint, backbone, key, attrs, path)


@torch.no_grad()
def embed_tiles(
    slide_path: "str | Path",
    grid: TileGrid,
    backbone: nn.Module,
    batch_size: int = 64,
    num_workers: int = 0,
    device: "str | torch.device | None" = None,
    transform: Optional[Callable[[np.ndarray], Any]] = None,
    backend: str = "auto",
) -> np.ndarray:
    """Features ``(N, D)`` float32 of every tile of ``grid``, read by ``num_workers`` workers."""
    if len(grid) == 0:
        raise ValueError(f"embed_tiles: the tile grid of {slide_path} is empty")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    dataset = TileDataset(slide_path, grid, transform=transform, backend=backend)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out = []
    try:
        with module_mode(backbone, False):
            for images, _ in loader:
                feats = backbone(images.to(device, non_blocking=True))
                if feats.ndim != 2:
                    raise ValueError(
                        f"embed_tiles: backbone returned shape {tuple(feats.shape)}; expected pooled (B, D) features"
                    )
                out.append(feats.float().cpu())
    finally:
        dataset.close()
    return torch.cat(out).numpy()


def _transform_id(transform: Any, transform_id: Optional[str]) -> str:
    if transform_id is not None:
        return transform_id
    return "default" if transform is None else repr(transform)


def embed_slide(
    slide_path: "str | Path",
    grid: TileGrid,
    backbone: nn.Module,
    cache: "SlideFeatureStore | str | Path | None" = None,
    transform: Optional[Callable[[np.ndarray], Any]] = None,
    transform_id: Optional[str] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: "str | torch.device | None" = None,
    backend: str = "auto",
    overwrite: bool = False,
) -> SlideFeatures:
    """Features of the tiles of ``grid``, from ``cache`` when present, else computed and cached."""
    fingerprint = slide_fingerprint(slide_path)
    if grid.slide_fingerprint and grid.slide_fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"embed_slide: grid made for slide {grid.slide_fingerprint}, but {slide_path} is {fingerprint}"
        )
    cache = SlideFeatureStore(cache) if isinstance(cache, (str, Path)) else cache
    name = _backbone_name(backbone)
    key = SlideFeatureStore.make_key(fingerprint, name, backbone_digest(backbone), grid.params(), _transform_id(transform, transform_id))
    if cache is not None and not overwrite:
        hit = cache.load(fingerprint, key)
        if hit is not None:
            return hit
    feats = embed_tiles(slide_path, grid, backbone, batch_size, num_workers, device, transform, backend)
    result = SlideFeatures(
        features=feats,
        coords=grid.coords,
        slide_fingerprint=fingerprint,
        backbone=name,
        key=key,
        attrs=_grid_attrs(grid),
    )
    if cache is not None:
        cache.write(result)
    return result


def _grid_attrs(grid: TileGrid) -> dict[str, Any]:
    return {
        "patch_level": int(grid.level),
        "patch_size": int(grid.read_size),
        "tile_size": int(grid.tile_size),
        "level_downsample": float(grid.level_downsample),
        "mpp": float("nan") if grid.mpp is None else float(grid.mpp),
        "slide_fingerprint": grid.slide_fingerprint,
    }


def slide_features(
    slide_path: "str | Path",
    backbone: nn.Module,
    cache: "SlideFeatureStore | str | Path | None" = None,
    tiling: Optional[dict[str, Any]] = None,
    max_tiles: Optional[int] = None,
    seed: int = 0,
    transform: Optional[Callable[[np.ndarray], Any]] = None,
    transform_id: Optional[str] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: "str | torch.device | None" = None,
    backend: str = "auto",
) -> SlideFeatures:
    """Tile (``tile_slide(**tiling)``), sample at most ``max_tiles`` (seeded), embed and cache.

    The cache key is the tiling request, so a cache hit skips tissue detection and tiling too.
    """
    tiling = dict(tiling or {})
    fingerprint = slide_fingerprint(slide_path)
    cache = SlideFeatureStore(cache) if isinstance(cache, (str, Path)) else cache
    name = _backbone_name(backbone)
    params = {"tiling": tiling, "max_tiles": max_tiles, "seed": seed if max_tiles else None}
    key = SlideFeatureStore.make_key(fingerprint, name, backbone_digest(backbone), params, _transform_id(transform, transform_id))
    if cache is not None:
        hit = cache.load(fingerprint, key)
        if hit is not None:
            return hit
    grid = tile_slide(slide_path, backend=backend, **tiling)
    if max_tiles is not None:
        grid = grid.sample(int(max_tiles), seed=seed)
    feats = embed_tiles(slide_path, grid, backbone, batch_size, num_workers, device, transform, backend)
    result = SlideFeatures(feats, grid.coords, fingerprint, name, key, _grid_attrs(grid))
    if cache is not None:
        cache.write(result)
    return result
