"""Feature caching for frozen-backbone learners: embed every image of a protocol run once, and
(optionally) once across methods and runs.

**In memory.** A learner with ``frozen_backbone = True`` predicts through ``embed`` only (ProtoNet
at test time, SimpleShot, linear probes), so its episodes can be solved on features: the images
that any episode of a task uses are embedded once, in sorted batches, and every episode then calls
``learner.adapt_features`` on rows of that cache. The results equal the plain path
(``learner.adapt`` on images) up to floating-point batching effects; the gain is that an image
used by many episodes (100 instances x 8 shot counts in the L2L protocol) is read and embedded
once instead of once per episode.

**On disk** (``cache_dir``, ``ProtocolConfig.feature_cache_dir``). The features of each dataset's
images are also kept in ``<cache_dir>/<dataset id>/<key hash>.pt`` files, one row per dataset
image index, so a second method with the same backbone, or a second run, reads them instead of
embedding. The key (:func:`feature_key`, stored in the file and compared on load) is:

* the data: the source's :meth:`feature_cache_identity` (MedIMeta sources: dataset id, image
  format, size and modification time of ``images.hdf5`` / the TIFF folder, and the
  :class:`~medmeta.data.transforms.ImageTransform`: channels, size, normalisation). Tasks and
  splits of one dataset share the file (features depend on the image, not on its labels or
  split); a source that cannot name its data this way (in-memory arrays, a user ``transform``
  callable) is only cached in memory;
* the features: the class that defines ``embed`` (so ProtoNet and a linear probe share it), the
  backbone's class and a BLAKE2b hash of every tensor of its ``state_dict`` (weights and buffers),
  the device type, and the torch / timm versions.

**Invalidation rule**: anything in the key changing gives another file, so the features are
embedded again: rewritten data files (new size or modification time), another image size, channel
count or normalisation, other weights (fine-tuned, another checkpoint, ``pretrained=`` another
name), another ``embed``, device type or torch / timm version. Nothing is ever deleted
automatically: remove the folder to reclaim space. Missing images of a dataset are embedded and
merged into its file (written atomically with :mod:`medmeta.io`; with two writers at once the
last one wins, losing only the other's additions). A file that cannot be read, fails its checksum
or holds another key is reported with a warning and replaced by freshly embedded features.
Files hold tensors and plain values only and are read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medmeta.data.source import Positions, TaskSource
from medmeta.episodes.labels import labels_to_tensor
from medmeta.episodes.spec import EpisodeSpec
from medmeta.learners.base import Learner

__all__ = ["FeatureCache", "DiskFeatureStore", "feature_key", "weights_fingerprint", "supports_feature_cache"]

log = logging.getLogger(__name__)

FORMAT = "medmeta-feature-cache"
VERSION = 1


def supports_feature_cache(learner: Learner) -> bool:
    """True when the learner declares a frozen backbone (its predictions depend on ``embed``)."""
    return bool(getattr(learner, "frozen_backbone", False))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """BLAKE2b (16 bytes, hex) of every ``state_dict`` entry: name, dtype, shape and bytes.

    Weights and buffers (BatchNorm statistics) both count; about 0.1 s per 100 MB of weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _embed_owner(learner: Learner) -> str:
    for cls in type(learner).__mro__:
        if "embed" in vars(cls):
            return f"{cls.__module__}.{cls.__qualname__}.embed"
    return f"{type(learner).__module__}.{type(learner).__qualname__}"


def feature_key(learner: Learner, source: TaskSource, device: torch.device) -> Optional[dict[str, Any]]:
    """The on-disk cache key of ``learner``'s features of ``source``'s images (module doc), or
    ``None`` when the source cannot name its data (then only the in-memory cache is used)."""
    identity_fn = getattr(source, "feature_cache_identity", None)
    identity = identity_fn() if callable(identity_fn) else None
    if identity is None:
        return None
    backbone = getattr(learner, "backbone", None)
    module = backbone if isinstance(backbone, torch.nn.Module) else learner
    try:
        import timm

        timm_version = str(timm.__version__)
    except ImportError:  # pragma: no cover - timm is a core dependency
        timm_version = "none"
    return {
        "format": FORMAT,
        "version": VERSION,
        "data": dict(identity),
        "embed": _embed_owner(learner),
        "backbone": f"{type(module).__module__}.{type(module).__qualname__}",
        "weights": weights_fingerprint(module),
        "device": torch.device(device).type,
        "torch": str(torch.__version__),
        "timm": timm_version,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def _checksum(indices: Tensor, features: Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(indices.numpy().tobytes())
    digest.update(f"{features.dtype}{tuple(features.shape)}".encode())
    digest.update(features.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiskFeatureStore:
    """Feature files under ``root``: one per (dataset data, features key); see the module doc."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            from medmeta.errors import ConfigError

            raise ConfigError(f"feature_cache_dir: {self.root} exists and is not a folder (expected a folder for "
                              f"feature files)")

    def path(self, key: dict[str, Any]) -> Path:
        """The file of ``key``: ``<root>/<dataset id>/<key hash>.pt``."""
        dataset = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key["data"].get("dataset_id", "data"))).strip("-") or "data"
        return self.root / dataset / f"{_key_hash(key)}.pt"

    def load(self, key: dict[str, Any]) -> Optional[tuple[np.ndarray, Tensor]]:
        """``(sorted image indices, features)`` stored for ``key``; ``None`` when there is no
        file, or (with a warning) when it is unreadable, fails its checksum or holds another key."""
        from medmeta.errors import MedMetaError
        from medmeta.io import load_torch_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            payload = load_torch_file(path, "feature cache file")
            indices, features = payload["image_indices"], payload["features"]
            problem = None
            if payload.get("key") != json.loads(json.dumps(key, default=str)):
                problem = "it holds features of another key"
            elif not isinstance(indices, Tensor) or not isinstance(features, Tensor) or indices.ndim != 1 or (
                features.ndim < 1 or len(features) != len(indices)
            ):
                problem = "its tensors have unexpected shapes"
            elif payload.get("checksum") != _checksum(indices, features):
                problem = "its checksum does not match (a damaged file)"
        except (MedMetaError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            problem = f"it cannot be read ({err})"
        if problem is not None:
            warnings.warn(f"feature cache file {path}: {problem}; embedding again and replacing it", stacklevel=3)
            return None
        return indices.numpy().astype(np.int64, copy=False), features

    def save(self, key: dict[str, Any], indices: np.ndarray, features: Tensor) -> Path:
        """Write ``features`` of sorted distinct ``indices`` for ``key`` atomically."""
        from medmeta.io import atomic_path

        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        feats = features.detach().to("cpu").contiguous()
        payload = {"key": json.loads(json.dumps(key, default=str)), "image_indices": idx, "features": feats,
                   "checksum": _checksum(idx, feats)}
        path = self.path(key)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path


class FeatureCache:
    """``learner.embed`` features of the items at ``positions`` of ``source``.

    Args:
        learner: a frozen-backbone learner (``embed`` and ``adapt_features``).
        source: the task source the positions refer to.
        positions: item positions to embed (duplicates are embedded once).
        batch_size: images per ``read_images`` + ``embed`` call.
        device: where to embed and keep the features (default: the learner's device).
        cache_dir: a folder of on-disk feature files (module doc): features found there are read
            instead of embedded, new ones are added; ``None`` keeps the cache in memory only.

    Attributes:
        images_embedded: images this cache passed through ``embed``.
        images_loaded: images whose features came from ``cache_dir``.
        disk_path: the feature file used, or ``None``.
    """

    def __init__(
        self,
        learner: Learner,
        source: TaskSource,
        positions: Positions,
        batch_size: int = 256,
        device: Optional[Any] = None,
        cache_dir: Optional[Union[str, Path]] = None,
    ) -> None:
        if not supports_feature_cache(learner):
            raise ValueError(
                f"FeatureCache: {type(learner).__name__} does not declare frozen_backbone=True; its "
                f"predictions may change the backbone, so cached features would give other results"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.learner = learner
        self.source = source
        self.device = torch.device(device) if device is not None else _module_device(learner)
        unique = np.unique(np.asarray(positions, dtype=np.int64))
        if len(unique) and (unique[0] < 0 or unique[-1] >= len(source)):
            raise ValueError(f"FeatureCache: positions outside 0..{len(source) - 1}")
        self.positions = unique
        self._row = np.full(len(source), -1, dtype=np.int64)
        self._row[unique] = np.arange(len(unique))
        self.images_embedded = 0
        self.images_loaded = 0
        self.disk_path: Optional[Path] = None

        store = DiskFeatureStore(cache_dir) if cache_dir is not None else None
        key = feature_key(learner, source, self.device) if store is not None and len(unique) else None
        image_idx = np.asarray(source.image_indices, dtype=np.int64)[unique]
        stored = store.load(key) if store is not None and key is not None else None
        found = np.zeros(len(unique), dtype=bool)
        rows_in_stored = np.zeros(len(unique), dtype=np.int64)
        if stored is not None:
            stored_idx = stored[0]
            at = np.searchsorted(stored_idx, image_idx)
            at_clipped = np.minimum(at, max(len(stored_idx) - 1, 0))
            found = (at < len(stored_idx)) & (stored_idx[at_clipped] == image_idx) if len(stored_idx) else found
            rows_in_stored = at_clipped
        missing = unique[~found]
        embedded = self._embed(missing, int(batch_size))
        self.images_embedded = len(missing)
        self.images_loaded = int(found.sum())
        if stored is not None and found.any():
            loaded = stored[1][torch.from_numpy(rows_in_stored[found])].to(self.device)
            dim = loaded.shape[1:]
            features = torch.empty((len(unique), *dim), dtype=loaded.dtype, device=self.device)
            features[torch.from_numpy(np.flatnonzero(found)).to(self.device)] = loaded
            if len(missing):
                features[torch.from_numpy(np.flatnonzero(~found)).to(self.device)] = embedded.to(loaded.dtype)
        else:
            features = embedded
        self.features: Tensor = features
        if store is not None and key is not None:
            self.disk_path = store.path(key)
            if len(missing):
                self._merge_into(store, key, stored, image_idx, features)

    def _embed(self, positions: np.ndarray, batch_size: int) -> Tensor:
        chunks = []
        with torch.no_grad():
            for i in range(0, len(positions), batch_size):
                images = self.source.read_images(positions[i : i + batch_size])
                chunks.append(self.learner.embed(images.to(self.device)))
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=self.device)

    @staticmethod
    def _merge_into(
        store: DiskFeatureStore,
        key: dict[str, Any],
        stored: Optional[tuple[np.ndarray, Tensor]],
        image_idx: np.ndarray,
        features: Tensor,
    ) -> None:
        new_idx, new_feat = image_idx, features.detach().cpu()
        if stored is not None and len(stored[0]) and tuple(stored[1].shape[1:]) == tuple(new_feat.shape[1:]):
            all_idx = np.concatenate([stored[0], new_idx])
            all_feat = torch.cat([stored[1].to(new_feat.dtype), new_feat])
            order_idx, first = np.unique(all_idx[::-1], return_index=True)  # the newest row of each index
            take = len(all_idx) - 1 - first
            new_idx, new_feat = order_idx, all_feat[torch.from_numpy(take)]
        try:
            store.save(key, new_idx, new_feat)
        except OSError as err:  # a read-only or full disk costs only the reuse, never the run
            warnings.warn(f"feature cache: could not write {store.path(key)} ({err}); features stay in memory",
                          stacklevel=3)

    @classmethod
    def for_specs(
        cls,
        learner: Learner,
        source: TaskSource,
        specs: Sequence[EpisodeSpec],
        batch_size: int = 256,
        device: Optional[Any] = None,
        cache_dir: Optional[Union[str, Path]] = None,
    ) -> "FeatureCache":
        """A cache of every image the episodes use."""
        positions = np.concatenate([s.positions for s in specs]) if specs else np.zeros(0, dtype=np.int64)
        return cls(learner, source, positions, batch_size=batch_size, device=device, cache_dir=cache_dir)

    def __len__(self) -> int:
        return int(len(self.positions))

    def get(self, positions: Positions) -> Tensor:
        """Cached features of item ``positions`` (in the order given)."""
        pos = np.asarray(positions, dtype=np.int64)
        rows = self._row[pos]
        if np.any(rows < 0):
            missing = pos[rows < 0][:10].tolist()
            raise KeyError(f"FeatureCache: positions {missing} were not embedded")
        return self.features[torch.as_tensor(rows, device=self.features.device)]

    def solve(self, spec: EpisodeSpec) -> Tensor:
        """Query logits of an episode, adapting on cached support features."""
        support = self.get(spec.support_positions)
        labels = labels_to_tensor(spec.support_labels, spec.target).to(support.device)
        predictor = self.learner.adapt_features(support, labels, spec.description)
        with torch.no_grad():
            return predictor(self.get(spec.query_positions))


def _module_device(module: torch.nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")
