"""Training patches for cell detection: crops around annotated cells, cell-free and negative crops.

Following what worked in the Tianchi challenge (top teams trained on crops around annotated
cells inside ROIs, plus backgrounds from negative slides), :class:`PatchSampler` draws windows:

* **cell windows**: a random crop that keeps an anchor cell whole, kept inside its ROI where the
  ROI is large enough (outside ROIs unannotated abnormal cells may exist, so those pixels would
  teach false negatives); every annotated box in the crop is clipped to it and kept when at least
  ``min_visible`` of its area is inside, dropped otherwise;
* **background windows**: cell-free crops inside ROIs (normal cells, debris: hard negatives);
* **negative windows**: crops from negative slides, on tissue when a tissue mask is available.

:class:`DetectionPatchDataset` reads the windows from the slides (level ``level``, patch size in
that level's pixels) and yields ``(image (3,H,W) float in [0,1], {"boxes": (k,4) xyxy float32,
"labels": (k,) int64})``, torchvision's detection convention, with optional flips and 90 degree
rotations (cytology has no preferred orientation).

Slides are opened with :func:`medmeta.adapters.slides.reader.open_slide` (TIFF/SVS conversions of
the challenge's ``.kfb`` files, or ``.kfb`` through the optional ``kfbslide`` backend);
:class:`ArraySlide` wraps an in-memory image (e.g. ROIs cropped once and stored, as the top teams
did) with the same reading interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medmeta.adapters.slides.detection.annotations import SlideAnnotation, boxes_in_roi, xywh_to_xyxy

__all__ = [
    "ArraySlide",
    "PatchWindow",
    "clip_boxes_to_window",
    "PatchSampler",
    "DetectionPatchDataset",
    "open_any_slide",
]


class ArraySlide:
    """An in-memory RGB image with the slide reader's interface (one level, or a 2x pyramid).

    ``read_region((x, y) level-0, level, (w, h))`` returns ``uint8 (h, w, 3)``; pixels outside
    the image read as white, like the slide readers.
    """

    def __init__(self, image: np.ndarray, mpp: Optional[float] = None, levels: int = 1) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"ArraySlide: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        self._levels = [image]
        for _ in range(1, levels):
            prev = self._levels[-1]
            h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
            if h < 2 or w < 2:
                break
            self._levels.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
        self.path = None
        self._mpp = None if mpp is None else (float(mpp), float(mpp))

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self._levels[0].shape[1], self._levels[0].shape[0])

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((im.shape[1], im.shape[0]) for im in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(2**i) for i in range(len(self._levels)))

    @property
    def mpp(self) -> Optional[tuple[float, float]]:
        return self._mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        im = self._levels[level]
        d = 2**level
        x, y = int(location[0]) // d, int(location[1]) // d
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, im.shape[1]), min(y + h, im.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = im[y0:y1, x0:x1]
        return out

    def get_thumbnail(self, max_size: "int | tuple[int, int]") -> np.ndarray:
        m = max_size if isinstance(max_size, int) else max(max_size)
        im = self._levels[0]
        step = max(1, int(np.ceil(max(im.shape[:2]) / m)))
        return im[::step, ::step].copy()


def open_any_slide(slide: Any) -> Any:
    """A path opens through the slide reader; anything with ``read_region`` is used as is."""
    if hasattr(slide, "read_region"):
        return slide
    from medmeta.adapters.slides.reader import open_slide

    return open_slide(slide)


@dataclass
class PatchWindow:
    """One training patch: slide ``slide_index``, level-0 top-left ``(x, y)``, read at ``level``.

    ``boxes`` are ``xyxy`` in patch pixels (at ``level``), ``labels`` their classes (1 = ``pos``).
    """

    slide_index: int
    x: int
    y: int
    kind: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def clip_boxes_to_window(
    boxes_xywh: np.ndarray, window: tuple[float, float, float, float], min_visible: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to a ``xywh`` window, in window coordinates (``xyxy``), and the kept indices.

    A box is kept when at least ``min_visible`` of its area lies inside the window.
    """
    b = xywh_to_xyxy(boxes_xywh)
    wx, wy, ww, wh = window
    clipped = np.stack([
        np.clip(b[:, 0], wx, wx + ww), np.clip(b[:, 1], wy, wy + wh),
        np.clip(b[:, 2], wx, wx + ww), np.clip(b[:, 3], wy, wy + wh),
    ], axis=1) if len(b) else np.zeros((0, 4))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    vis = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    keep = np.flatnonzero((vis > 0) & (vis >= min_visible * area))
    out = clipped[keep] - np.array([wx, wy, wx, wy])
    return out, keep


def _range_for_box(lo_box: float, hi_box: float, extent: float, roi_lo: float, roi_hi: float) -> tuple[float, float]:
    """Window starts that keep ``[lo_box, hi_box]`` whole, inside ``[roi_lo, roi_hi]`` if it fits."""
    keep_lo, keep_hi = hi_box - extent, lo_box  # the box stays whole
    if roi_hi - roi_lo >= extent:
        lo, hi = max(keep_lo, roi_lo), min(keep_hi, roi_hi - extent)  # window inside the ROI
    else:
        lo, hi = max(keep_lo, roi_hi - extent), min(keep_hi, roi_lo)  # window covers the ROI
    if lo > hi:
        lo, hi = keep_lo, keep_hi
    if lo > hi:  # the box is larger than the window: centre on it
        lo = hi = (lo_box + hi_box - extent) / 2
    return lo, hi


class PatchSampler:
    """Draw :class:`PatchWindow` lists from annotated slides (positives) and negative slides.

    ``slides``: paths or opened readers; ``annotations``: one :class:`SlideAnnotation` (or
    ``None`` for a negative slide) per slide. ``patch_size`` is in pixels of ``level``.
    ``tissue_masks`` (optional, per slide, objects with ``fraction(x, y, w, h)`` on level-0
    rectangles) keep negative windows on tissue.
    """

    def __init__(
        self,
        slides: Sequence[Any],
        annotations: Sequence[Optional[SlideAnnotation]],
        patch_size: int = 256,
        level: int = 0,
        min_visible: float = 0.6,
        roi_rule: str = "center",
        tissue_masks: Optional[Sequence[Any]] = None,
        min_tissue: float = 0.3,
    ) -> None:
        if len(slides) != len(annotations):
            raise ValueError(f"PatchSampler: {len(slides)} slides but {len(annotations)} annotations")
        if patch_size < 16:
            raise ValueError(f"PatchSampler: patch_size must be >= 16, got {patch_size}")
        if not 0 < min_visible <= 1:
            raise ValueError(f"PatchSampler: min_visible must be in (0, 1], got {min_visible}")
        self.slides = list(slides)
        self.annotations = list(annotations)
        self.patch_size = int(patch_size)
        self.level = int(level)
        self.min_visible = float(min_visible)
        self.roi_rule = roi_rule
        self.tissue_masks = list(tissue_masks) if tissue_masks is not None else [None] * len(slides)
        self.min_tissue = float(min_tissue)
        self._geometry: dict[int, tuple[tuple[int, int], float]] = {}

    def geometry(self, i: int) -> tuple[tuple[int, int], float]:
        """Level-0 dimensions of slide ``i`` and the downsample of the sampling level."""
        if i not in self._geometry:
            slide = open_any_slide(self.slides[i])
            if self.level >= slide.level_count:
                raise ValueError(f"PatchSampler: slide {self.slides[i]} has {slide.level_count} level(s), level {self.level} asked")
            self._geometry[i] = (tuple(slide.dimensions), float(slide.level_downsamples[self.level]))
            ann = self.annotations[i]
            if ann is not None:
                w, h = slide.dimensions
                for what, arr in (("roi", ann.rois), ("pos", ann.cells)):
                    bad = np.flatnonzero((arr[:, 0] + arr[:, 2] > w) | (arr[:, 1] + arr[:, 3] > h))
                    if len(bad):
                        raise ValueError(
                            f"annotation {ann.path or ann.slide_id}: {what} box {arr[bad[0]].tolist()} lies "
                            f"outside slide {self.slides[i]} of size {w} x {h}")
        return self._geometry[i]

    def _extent(self, i: int) -> float:
        return self.patch_size * self.geometry(i)[1]

    def _window(self, i: int, x: float, y: float, kind: str) -> PatchWindow:
        (w, h), down = self.geometry(i)
        ext = self._extent(i)
        x = int(round(min(max(x, 0.0), max(w - ext, 0.0))))
        y = int(round(min(max(y, 0.0), max(h - ext, 0.0))))
        ann = self.annotations[i]
        if ann is None or len(ann.cells) == 0:
            return PatchWindow(i, x, y, kind)
        boxes, _ = clip_boxes_to_window(ann.cells, (x, y, ext, ext), self.min_visible)
        boxes = (boxes / down).astype(np.float32)
        return PatchWindow(i, x, y, kind, boxes, np.ones(len(boxes), dtype=np.int64))

    def cell_windows(
        self, n_per_slide: int, rng: np.random.Generator, cells: Optional[Mapping[int, Sequence[int]]] = None
    ) -> list[PatchWindow]:
        """Crops keeping an anchor cell whole (inside its ROI where the ROI fits), per positive slide.

        Anchors are drawn with replacement from the slide's cells (``n_per_slide`` each), or are
        exactly ``cells[slide_index]`` when given.
        """
        out = []
        for i, ann in enumerate(self.annotations):
            if ann is None or len(ann.cells) == 0:
                continue
            ext = self._extent(i)
            if cells is not None:
                anchors = list(cells.get(i, []))
            else:
                anchors = list(rng.integers(len(ann.cells), size=n_per_slide))
            member = [boxes_in_roi(ann.cells, roi, self.roi_rule) for roi in ann.rois]
            for c in anchors:
                bx, by, bw, bh = ann.cells[int(c)]
                rois = [r for r, m in zip(ann.rois, member) if m[int(c)]]
                rx, ry, rw, rh = rois[int(rng.integers(len(rois)))] if rois else (bx, by, bw, bh)
                lo, hi = _range_for_box(bx, bx + bw, ext, rx, rx + rw)
                x = rng.uniform(lo, hi) if hi > lo else lo
                lo, hi = _range_for_box(by, by + bh, ext, ry, ry + rh)
                y = rng.uniform(lo, hi) if hi > lo else lo
                out.append(self._window(i, x, y, "cell"))
        return out

    def few_shot_windows(self, k: int, rng: np.random.Generator) -> list[PatchWindow]:
        """Windows around ``k`` annotated cells drawn without replacement over all positive slides."""
        pool = [(i, c) for i, a in enumerate(self.annotations) if a is not None for c in range(len(a.cells))]
        if k > len(pool):
            raise ValueError(f"few_shot_windows: k={k} cells asked, the annotations hold {len(pool)}")
        chosen = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
        cells: dict[int, list[int]] = {}
        for i, c in chosen:
            cells.setdefault(i, []).append(c)
        return self.cell_windows(0, rng, cells=cells)

    def background_windows(self, n_per_slide: int, rng: np.random.Generator, tries: int = 50) -> list[PatchWindow]:
        """Cell-free crops inside ROIs of positive slides (no annotated box touches them)."""
        out = []
        for i, ann in enumerate(self.annotations):
            if ann is None or len(ann.rois) == 0:
                continue
            ext = self._extent(i)
            cells = xywh_to_xyxy(ann.cells)
            for _ in range(n_per_slide):
                for _t in range(tries):
                    rx, ry, rw, rh = ann.rois[int(rng.integers(len(ann.rois)))]
                    if rw < ext or rh < ext:
                        continue
                    x, y = rng.uniform(rx, rx + rw - ext), rng.uniform(ry, ry + rh - ext)
                    hit = (cells[:, 0] < x + ext) & (cells[:, 2] > x) & (cells[:, 1] < y + ext) & (cells[:, 3] > y)
                    if not hit.any():
                        out.append(self._window(i, x, y, "background"))
                        break
        return out

    def negative_windows(self, n_per_slide: int, rng: np.random.Generator, tries: int = 50) -> list[PatchWindow]:
        """Random crops of negative slides (no ``pos`` boxes), on tissue when a mask is given."""
        out = []
        for i, ann in enumerate(self.annotations):
            if ann is not None and len(ann.cells):
                continue
            (w, h), _ = self.geometry(i)
            ext = self._extent(i)
            mask = self.tissue_masks[i]
            for _ in range(n_per_slide):
                for _t in range(tries):
                    x, y = rng.uniform(0, max(w - ext, 0)), rng.uniform(0, max(h - ext, 0))
                    if mask is None or mask.fraction(int(x), int(y), int(ext), int(ext)) >= self.min_tissue:
                        out.append(self._window(i, x, y, "negative"))
                        break
        return out

    def sample(
        self, n_cell: int = 32, n_background: int = 8, n_negative: int = 8, seed: int = 0
    ) -> list[PatchWindow]:
        """All three kinds at once: ``n_*`` windows per slide of the matching kind."""
        rng = np.random.default_rng(seed)
        return self.cell_windows(n_cell, rng) + self.background_windows(n_background, rng) + self.negative_windows(n_negative, rng)


def _augment(img: Tensor, boxes: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random horizontal/vertical flip and 90 degree rotation of a (3,H,W) patch and its xyxy boxes."""
    _, h, w = img.shape
    if torch.rand((), generator=gen) < 0.5:
        img = img.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if torch.rand((), generator=gen) < 0.5:
        img = img.flip(-2)
        boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)
    if h == w and torch.rand((), generator=gen) < 0.5:  # transpose: (x, y) -> (y, x)
        img = img.transpose(-1, -2)
        boxes = boxes[:, [1, 0, 3, 2]]
    return img.contiguous(), boxes


class DetectionPatchDataset(Dataset):
    """Patches read from slides with torchvision detection targets.

    Slides given as paths are opened lazily in each process (DataLoader workers included).
    ``augment`` applies flips and a transpose, seeded by ``seed`` and the item index (and
    ``set_epoch`` for new draws each epoch).
    """

    def __init__(
        self,
        slides: Sequence[Any],
        windows: Sequence[PatchWindow],
        patch_size: int,
        level: int = 0,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.slides = list(slides)
        self.windows = list(windows)
        self.patch_size = int(patch_size)
        self.level = int(level)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._open: dict[int, Any] = {}
        for w in self.windows:
            if not 0 <= w.slide_index < len(self.slides):
                raise ValueError(f"DetectionPatchDataset: window refers to slide {w.slide_index}, only {len(self.slides)} given")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def _slide(self, i: int) -> Any:
        if i not in self._open:
            self._open[i] = open_any_slide(self.slides[i])
        return self._open[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {k: v for k, v in self._open.items() if isinstance(self.slides[k], ArraySlide)}
        return state

    def read(self, index: int) -> np.ndarray:
        """The patch pixels ``uint8 (patch_size, patch_size, 3)``."""
        w = self.windows[index]
        return self._slide(w.slide_index).read_region((w.x, w.y), self.level, (self.patch_size, self.patch_size))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.windows[index]
        img = torch.from_numpy(np.ascontiguousarray(self.read(index))).permute(2, 0, 1).float().div_(255.0)
        boxes = torch.as_tensor(w.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(w.labels, dtype=torch.int64).reshape(-1)
        if self.augment:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            img, boxes = _augment(img, boxes, gen)
        return img, {"boxes": boxes, "labels": labels}
