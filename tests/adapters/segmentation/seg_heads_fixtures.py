"""Shared data of the seg_heads tests: a few-shot episode cut from stardist's real nuclei image."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from medmeta.adapters.segmentation.real_data import nuclei_2d, tile_image

try:  # the seg_core metrics when present, else the textbook definition
    from medmeta.adapters.segmentation.metrics import dice as _dice
except ImportError:  # pragma: no cover
    def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
        p, g = np.asarray(pred, bool), np.asarray(gt, bool)
        s = p.sum() + g.sum()
        return 1.0 if s == 0 else float(2 * (p & g).sum() / s)


def dice(pred: "Tensor | np.ndarray", gt: "Tensor | np.ndarray") -> float:
    """Dice of two binary masks (tensors or arrays) over the whole batch."""
    to_np = lambda a: a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)  # noqa: E731
    return float(_dice(to_np(pred).astype(bool), to_np(gt).astype(bool)))


@functools.lru_cache(maxsize=None)
def nuclei_episode(tile: int = 64, n_support: int = 2, n_query: int = 8, seed: int = 0) -> tuple[Tensor, ...]:
    """Support and held-out query tiles of the nuclei image (binary masks), fixed by ``seed``.

    Support tiles are drawn among tiles that are at least 10 % nuclei; queries are other tiles.
    """
    img, mask = nuclei_2d(binary=True)
    tiles, masks = tile_image(img, mask, tile)
    perm = np.random.default_rng(seed).permutation(len(tiles))
    sidx = [int(i) for i in perm if masks[i].mean() > 0.1][:n_support]
    qidx = [int(i) for i in perm if int(i) not in sidx][:n_query]
    return (
        torch.from_numpy(tiles[sidx])[:, None],
        torch.from_numpy(masks[sidx]),
        torch.from_numpy(tiles[qidx])[:, None],
        torch.from_numpy(masks[qidx]),
    )


class IdentityBackbone(nn.Module):
    """A 'backbone' whose one feature map is the image itself (for hand-computed checks)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.feature_channels = [channels]
        self.feature_reductions = [1]
        self.scale = nn.Parameter(torch.ones(()))

    def dense_features(self, x: Tensor) -> list[Tensor]:
        return [x * self.scale]
