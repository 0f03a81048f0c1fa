"""Tianchi cervical cytology annotations and submissions: read, validate, map to ROIs, write.

The challenge ("Digital Human" cervical cancer risk diagnosis, Tianchi 2019) annotates each
positive slide with a JSON *list* of level-0 boxes ``{"x", "y", "w", "h", "class"}``: ``"roi"``
boxes are annotated regions and ``"pos"`` boxes are abnormal squamous cells (ASC-US, LSIL, ASC-H,
HSIL) inside them. Cells outside every ROI are *not* guaranteed negative. Negative slides have no
annotation (or an empty list). A submission is a folder of ``<slide id>.json`` files, each a list
of ``{"x", "y", "w", "h", "p"}`` predicted boxes with a confidence ``p``.

Boxes are held as ``float64`` arrays of shape ``(N, 4)`` in ``xywh`` (the file convention);
:func:`xywh_to_xyxy` / :func:`xyxy_to_xywh` convert for torchvision, which uses corners.

The original slides came in the vendor's ``.kfb`` format; medmeta works on slides converted to
TIFF/SVS (the slide reader can open ``.kfb`` through the optional ``kfbslide`` backend).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from medmeta.errors import MissingDataError, UserError
from medmeta.io import write_text_atomic

__all__ = [
    "AnnotationError",
    "SlideAnnotation",
    "ANNOTATION_CLASSES",
    "ROI_RULES",
    "read_annotation",
    "read_annotation_folder",
    "write_annotation",
    "read_predictions",
    "read_submission",
    "write_predictions",
    "boxes_in_roi",
    "assign_to_rois",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "atomic_write_text",
]

ANNOTATION_CLASSES = ("roi", "pos")
ROI_RULES = ("center", "inside")
_ANNOTATION_SUFFIXES = (".json",)


class AnnotationError(UserError, ValueError):
    """A malformed annotation or prediction file; the message names the file and the entry."""


@dataclass
class SlideAnnotation:
    """The boxes of one slide: ROIs and abnormal cells (``pos``), level-0 ``xywh``.

    ``slide_id`` is the file stem (``20160050033533_ano`` for ``20160050033533_ano.json``).
    A negative slide has no ROIs and no cells.
    """

    slide_id: str
    rois: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    cells: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        self.rois = np.asarray(self.rois, dtype=np.float64).reshape(-1, 4)
        self.cells = np.asarray(self.cells, dtype=np.float64).reshape(-1, 4)

    @property
    def is_negative(self) -> bool:
        return len(self.cells) == 0

    def cells_by_roi(self, rule: str = "center") -> list[np.ndarray]:
        """Indices of the cells that belong to each ROI (see :func:`boxes_in_roi`)."""
        return assign_to_rois(self.cells, self.rois, rule=rule)

    def to_records(self) -> list[dict[str, Any]]:
        """The challenge JSON list: ROIs first, then cells, integer coordinates where exact."""
        out = []
        for cls, boxes in (("roi", self.rois), ("pos", self.cells)):
            for x, y, w, h in boxes:
                out.append({"x": _num(x), "y": _num(y), "w": _num(w), "h": _num(h), "class": cls})
        return out


# ----------------------------------------------------------------------------- box helpers
def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ``x, y, w, h`` to corners ``x1, y1, x2, y2``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` corners to ``x, y, w, h``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def boxes_in_roi(boxes: np.ndarray, roi: "Sequence[float] | np.ndarray", rule: str = "center") -> np.ndarray:
    """Boolean mask of the ``xywh`` boxes that belong to one ``xywh`` ROI.

    ``rule="center"``: the box centre lies inside the ROI (half-open: ``x <= cx < x + w``), the
    rule most re-implementations of the challenge score use; ``rule="inside"``: the whole box lies
    inside the ROI. Which one the organisers used is not documented, hence the parameter.
    """
    if rule not in ROI_RULES:
        raise ValueError(f"roi_rule: expected one of {ROI_RULES}, got {rule!r}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rx, ry, rw, rh = (float(v) for v in roi)
    if rule == "center":
        cx = b[:, 0] + b[:, 2] / 2
        cy = b[:, 1] + b[:, 3] / 2
        return (cx >= rx) & (cx < rx + rw) & (cy >= ry) & (cy < ry + rh)
    return (b[:, 0] >= rx) & (b[:, 1] >= ry) & (b[:, 0] + b[:, 2] <= rx + rw) & (b[:, 1] + b[:, 3] <= ry + rh)


def assign_to_rois(boxes: np.ndarray, rois: np.ndarray, rule: str = "center") -> list[np.ndarray]:
    """For each ROI, the indices of ``boxes`` that belong to it (a box may belong to several)."""
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
    return [np.flatnonzero(boxes_in_roi(boxes, roi, rule)) for roi in rois]


# ----------------------------------------------------------------------------- validation
def _num(v: float) -> "int | float":
    f = float(v)
    return int(f) if f.is_integer() else f


def _load_json_list(path: Path, what: str) -> list:
    if not path.is_file():
        raise MissingDataError(f"{what} file {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{what} file {path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise AnnotationError(
            f"{what} file {path}: expected a JSON list of boxes, got a JSON {type(data).__name__}"
        )
    return data


def _check_box(
    entry: Any,
    index: int,
    path: "Path | str",
    extra_key: str,
    slide_size: Optional[tuple[int, int]],
) -> tuple[float, float, float, float]:
    where = f"{path}: entry {index}"
    if not isinstance(entry, Mapping):
        raise AnnotationError(f"{where}: expected an object with x, y, w, h, {extra_key}; got {entry!r}")
    missing = [k for k in ("x", "y", "w", "h", extra_key) if k not in entry]
    if missing:
        raise AnnotationError(f"{where}: missing field(s) {missing} in {dict(entry)!r}")
    vals = []
    for k in ("x", "y", "w", "h"):
        v = entry[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AnnotationError(f"{where}: field {k!r} must be a finite number, got {v!r}")
        vals.append(float(v))
    x, y, w, h = vals
    if w <= 0 or h <= 0:
        raise AnnotationError(f"{where}: box size must be positive, got w={w:g}, h={h:g}")
    if x < 0 or y < 0:
        raise AnnotationError(f"{where}: box corner must be non-negative, got x={x:g}, y={y:g}")
    if slide_size is not None:
        sw, sh = slide_size
        if x + w > sw or y + h > sh:
            raise AnnotationError(
                f"{where}: box (x={x:g}, y={y:g}, w={w:g}, h={h:g}) extends outside the slide "
                f"of size {sw} x {sh} (level-0 width x height)"
            )
    return x, y, w, h


# ----------------------------------------------------------------------------- annotations
def read_annotation(
    path: "str | Path",
    slide_size: Optional[tuple[int, int]] = None,
    slide_id: Optional[str] = None,
    require_cells_in_rois: bool = False,
) -> SlideAnnotation:
    """Read and validate one challenge annotation file.

    ``slide_size`` (level-0 ``(width, height)``) enables the out-of-slide check. Errors name the
    file and the entry index. ``require_cells_in_rois`` rejects ``pos`` boxes whose centre lies in
    no ROI (the challenge annotates cells only inside ROIs; off by default because some exports
    carry stray boxes).
    """
    path = Path(path)
    data = _load_json_list(path, "annotation")
    rois: list[tuple[float, float, float, float]] = []
    cells: list[tuple[float, float, float, float]] = []
    cell_entries: list[int] = []
    for i, entry in enumerate(data):
        box = _check_box(entry, i, path, "class", slide_size)
        cls = entry["class"]
        if cls not in ANNOTATION_CLASSES:
            raise AnnotationError(f"{path}: entry {i}: unknown class {cls!r}; expected one of {ANNOTATION_CLASSES}")
        (rois if cls == "roi" else cells).append(box)
        if cls == "pos":
            cell_entries.append(i)
    ann = SlideAnnotation(slide_id or path.stem, np.array(rois).reshape(-1, 4), np.array(cells).reshape(-1, 4), path)
    if require_cells_in_rois and len(ann.cells):
        covered = np.zeros(len(ann.cells), dtype=bool)
        for idx in ann.cells_by_roi("center"):
            covered[idx] = True
        if not covered.all():
            bad = cell_entries[int(np.flatnonzero(~covered)[0])]
            raise AnnotationError(f"{path}: entry {bad}: pos box centre lies in no ROI")
    return ann


def read_annotation_folder(
    folder: "str | Path",
    slide_sizes: Optional[Mapping[str, tuple[int, int]]] = None,
) -> dict[str, SlideAnnotation]:
    """All ``*.json`` annotations of a folder, keyed by slide id (file stem)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDataError(f"annotation folder {folder} does not exist")
    out = {}
    for p in sorted(folder.glob("*.json")):
        size = None if slide_sizes is None else slide_sizes.get(p.stem)
        out[p.stem] = read_annotation(p, slide_size=size)
    return out


def atomic_write_text(path: "str | Path", text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    return write_text_atomic(path, text)


def write_annotation(path: "str | Path", annotation: SlideAnnotation) -> Path:
    """Write a challenge annotation JSON list (atomically)."""
    return atomic_write_text(path, json.dumps(annotation.to_records()))


# ----------------------------------------------------------------------------- predictions
def write_predictions(
    folder: "str | Path",
    slide_id: str,
    boxes_xywh: np.ndarray,
    scores: np.ndarray,
    decimals: int = 1,
) -> Path:
    """Write ``<folder>/<slide_id>.json`` in the submission format, atomically.

    Coordinates are rounded to ``decimals`` places (0 gives integers as in the organisers'
    example); scores are kept at full float precision so the ranking is unchanged.
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"write_predictions({slide_id}): {len(boxes)} boxes but {len(scores)} scores")
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise ValueError(f"write_predictions({slide_id}): boxes and scores must be finite")
    if "/" in slide_id or os.sep in slide_id or not slide_id:
        raise ValueError(f"write_predictions: slide id {slide_id!r} is not a plain file stem")
    recs = []
    for (x, y, w, h), p in zip(boxes, scores):
        r = (lambda v: _num(round(float(v), decimals))) if decimals > 0 else (lambda v: int(round(float(v))))
        recs.append({"x": r(x), "y": r(y), "w": r(w), "h": r(h), "p": float(p)})
    return atomic_write_text(Path(folder) / f"{slide_id}.json", json.dumps(recs))


def read_predictions(
    path: "str | Path",
    slide_size: Optional[tuple[int, int]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one submission file: ``(boxes xywh (N, 4), scores (N,))``, validated.

    Boxes may extend past the slide (detectors do that at borders) unless ``slide_size`` is
    given; scores must be finite numbers.
    """
    path = Path(path)
    data = _load_json_list(path, "prediction")
    boxes, scores = [], []
    for i, entry in enumerate(data):
        boxes.append(_check_box(entry, i, path, "p", slide_size))
        p = entry["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise AnnotationError(f"{path}: entry {i}: field 'p' must be a finite number, got {p!r}")
        scores.append(float(p))
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(scores, dtype=np.float64)


def read_submission(
    folder: "str | Path",
    slide_ids: Iterable[str],
    slide_sizes: Optional[Mapping[str, tuple[int, int]]] = None,
    allow_missing: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a submission folder for the given slides.

    A ``*.json`` file whose stem is not one of ``slide_ids`` is an error (a prediction for a
    slide that does not exist, usually a renamed or mistyped id); a slide without a file has no
    predictions (or is an error with ``allow_missing=False``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDataError(f"submission folder {folder} does not exist")
    known = list(dict.fromkeys(slide_ids))
    known_set = set(known)
    files = {p.stem: p for p in sorted(folder.glob("*.json"))}
    unknown = sorted(set(files) - known_set)
    if unknown:
        raise AnnotationError(
            f"submission folder {folder}: prediction file {files[unknown[0]].name} names slide "
            f"{unknown[0]!r}, which is not among the {len(known)} slides scored"
            + (f" ({len(unknown) - 1} more such files)" if len(unknown) > 1 else "")
        )
    out = {}
    for sid in known:
        if sid in files:
            size = None if slide_sizes is None else slide_sizes.get(sid)
            out[sid] = read_predictions(files[sid], slide_size=size)
        elif allow_missing:
            out[sid] = (np.zeros((0, 4)), np.zeros(0))
        else:
            raise MissingDataError(f"submission folder {folder}: no prediction file {sid}.json")
    return out
