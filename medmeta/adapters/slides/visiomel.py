"""VisioMel-style slide challenge runner: ``data/`` in, ``submission.csv`` out, within a time budget.

The VisioMel challenge (melanoma relapse within five years from pyramidal TIFF slides plus
metadata) runs submitted code offline: ``data/`` holds the test slides, ``test_metadata.csv``
and ``submission_format.csv``; the code must write ``submission.csv`` with exactly the format's
columns (``filename,relapse``) and row order, relapse probabilities in [0, 1], must not print
or log data values, and must finish in the time limit. The score is plain log loss
(:func:`visiomel_log_loss`).

:func:`main` does that with a model saved by :func:`save_visiomel_model` (or trained by
:func:`train_visiomel`) in an assets folder: a tile backbone, tiling parameters, a MIL head, and
optionally a logistic model combining the MIL score with encoded metadata. Per slide: tissue,
tiles at the model's scale, at most ``max_tiles`` tiles, fewer when the remaining time requires
it (tiles per second are measured as the run goes), embeddings, MIL score. A slide that fails
(unreadable, no tissue, scale unavailable, out of time) gets the fallback probability (the
training prior) and is recorded with its reason in the report file, while the others finish.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from medmeta.adapters.slides.features import embed_tiles
from medmeta.adapters.slides.mil import Bags, create_mil_head, predict_mil, train_mil
from medmeta.adapters.slides.tiling import TileTransform, tile_slide
from medmeta.errors import DataFormatError, MissingDataError, exit_on_user_error
from medmeta.io import load_torch_file, write_text_atomic
from medmeta.threads import apply_num_threads
from medmeta.training.checkpoint import atomic_torch_save

__all__ = [
    "visiomel_log_loss",
    "validate_submission",
    "MetadataEncoder",
    "VisioMelModel",
    "save_visiomel_model",
    "load_visiomel_model",
    "train_visiomel",
    "predict_slide",
    "run",
    "main",
    "export_submission",
    "TEMPLATE_PATH",
]

log = logging.getLogger("medmeta.visiomel")

TEMPLATE_PATH = Path(__file__).with_name("templates") / "main.py"
MODEL_FILE = "visiomel_model.yaml"
HEAD_FILE = "mil_head.pt"
BACKBONE_FILE = "backbone.pt"


# ---- metric and format -------------------------------------------------------------------
def visiomel_log_loss(y_true: Sequence[float], y_pred: Sequence[float], eps: float = 1e-16) -> float:
    """Mean binary log loss with predictions clipped to ``[eps, 1 - eps]`` (sklearn semantics)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"visiomel_log_loss: {y.size} labels for {p.size} predictions")
    if y.size == 0:
        raise ValueError("visiomel_log_loss: no predictions")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("visiomel_log_loss: labels must be 0 or 1")
    if not np.all(np.isfinite(p)):
        raise ValueError("visiomel_log_loss: predictions contain NaN or infinity")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def validate_submission(submission: "pd.DataFrame | str | Path", submission_format: "pd.DataFrame | str | Path") -> pd.DataFrame:
    """Check a submission against the format: same columns, same row order, values in [0, 1]."""
    sub = submission if isinstance(submission, pd.DataFrame) else pd.read_csv(submission)
    fmt = submission_format if isinstance(submission_format, pd.DataFrame) else pd.read_csv(submission_format)
    if list(sub.columns) != list(fmt.columns):
        raise ValueError(f"submission: columns {list(sub.columns)} differ from the format's {list(fmt.columns)}")
    key = fmt.columns[0]
    if len(sub) != len(fmt) or not (sub[key].astype(str).to_numpy() == fmt[key].astype(str).to_numpy()).all():
        raise ValueError(f"submission: the {key!r} column does not match the format's rows and order")
    for col in fmt.columns[1:]:
        values = pd.to_numeric(sub[col], errors="coerce")
        if values.isna().any():
            raise ValueError(f"submission: column {col!r} has missing or non-numeric values")
        if ((values < 0) | (values > 1)).any():
            raise ValueError(f"submission: column {col!r} has values outside [0, 1]")
    return sub


# ---- metadata ----------------------------------------------------------------------------
_AGE_BIN = re.compile(r"^\s*[\[\]]\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*[\[\]]\s*$")


def _age_value(v: Any) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan")
    m = _AGE_BIN.match(str(v))
    if m:
        return (float(m.group(1)) + float(m.group(2))) / 2
    try:
        return float(v)
    except ValueError:
        return float("nan")


def _yes_no(v: Any) -> float:
    s = str(v).strip().upper() if v is not None else ""
    return {"YES": 1.0, "NO": 0.0, "1": 1.0, "0": 0.0, "TRUE": 1.0, "FALSE": 0.0}.get(s, 0.5)


@dataclass
class MetadataEncoder:
    """Encode VisioMel-style metadata columns as numbers, fitted on the training table.

    ``kinds`` maps a column to ``"age_bin"`` (``[40:42[`` -> 41, scaled by 1/100),
    ``"yes_no"`` (YES 1, NO 0, empty 0.5), ``"sex"`` (1 -> 0, 2 -> 1), ``"numeric"`` or
    ``"categorical"`` (one-hot over the training values). Missing numbers get the training mean.
    """

    kinds: dict[str, str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)

    KINDS = ("age_bin", "yes_no", "sex", "numeric", "categorical")

    def __post_init__(self) -> None:
        for col, kind in self.kinds.items():
            if kind not in self.KINDS:
                raise ValueError(f"metadata column {col!r}: kind {kind!r} not in {self.KINDS}")

    def _raw(self, df: pd.DataFrame, col: str) -> np.ndarray:
        kind = self.kinds[col]
        if kind == "age_bin":
            return np.array([_age_value(v) for v in df[col]]) / 100.0
        if kind == "yes_no":
            return np.array([_yes_no(v) for v in df[col]])
        if kind == "sex":
            return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float) - 1.0
        return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)

    def fit(self, df: pd.DataFrame) -> "MetadataEncoder":
        self.check(df, "training metadata")
        for col, kind in self.kinds.items():
            if kind == "categorical":
                self.categories[col] = sorted({str(v) for v in df[col].dropna()})
            else:
                values = self._raw(df, col)
                self.means[col] = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        return self

    def check(self, df: pd.DataFrame, where: str) -> None:
        missing = [c for c in self.kinds if c not in df.columns]
        if missing:
            raise DataFormatError(f"{where}: metadata column(s) {missing} missing; it has {list(df.columns)}")

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        self.check(df, "metadata")
        parts = []
        for col, kind in self.kinds.items():
            if kind == "categorical":
                values = df[col].astype(str).to_numpy()
                parts.append(np.stack([(values == c).astype(float) for c in self.categories[col]], axis=1)
                             if self.categories[col] else np.zeros((len(df), 0)))
            else:
                v = self._raw(df, col)
                v = np.where(np.isfinite(v), v, self.means.get(col, 0.0))
                parts.append(v[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(df), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": dict(self.kinds), "categories": dict(self.categories), "means": dict(self.means)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetadataEncoder":
        return cls(kinds=dict(d["kinds"]), categories={k: list(v) for k, v in d.get("categories", {}).items()},
                   means={k: float(v) for k, v in d.get("means", {}).items()})


# ---- the model ---------------------------------------------------------------------------
@dataclass
class VisioMelModel:
    """Everything inference needs: backbone, tiling, MIL head, optional metadata combiner."""

    backbone: nn.Module
    head: nn.Module
    tiling: dict[str, Any]
    max_tiles: int
    prior: float
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    metadata: Optional[MetadataEncoder] = None
    combiner: Optional[dict[str, Any]] = None  # {"mil": w, "meta": [w...], "bias": b}
    config: dict[str, Any] = field(default_factory=dict)

    def transform(self) -> TileTransform:
        return TileTransform(self.mean, self.std)

    def probability(self, mil_logit: float, metadata_row: Optional[np.ndarray]) -> float:
        """Relapse probability from the MIL logit, combined with metadata when both are there."""
        if self.combiner is not None and metadata_row is not None:
            z = self.combiner["mil"] * mil_logit + float(np.dot(self.combiner["meta"], metadata_row)) + self.combiner["bias"]
        else:
            z = mil_logit
        return float(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))))

    def to(self, device: "str | torch.device") -> "VisioMelModel":
        self.backbone.to(device)
        self.head.to(device)
        return self


def save_visiomel_model(
    assets_dir: "str | Path",
    backbone: nn.Module,
    head: nn.Module,
    head_name: str,
    head_kwargs: dict[str, Any],
    tiling: dict[str, Any],
    max_tiles: int,
    prior: float,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    metadata: Optional[MetadataEncoder] = None,
    combiner: Optional[dict[str, Any]] = None,
) -> Path:
    """Write the model as YAML plus two state-dict files (read back without pickle code)."""
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    inner = getattr(backbone, "model", backbone)
    atomic_torch_save(inner.state_dict(), assets_dir / BACKBONE_FILE)
    atomic_torch_save(head.state_dict(), assets_dir / HEAD_FILE)
    config = {
        "format": "medmeta-visiomel-1",
        "backbone": {"name": str(getattr(backbone, "name", "")), "weights": BACKBONE_FILE,
                     "num_features": int(getattr(backbone, "num_features", 0))},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "tiling": dict(tiling),
        "max_tiles": int(max_tiles),
        "head": {"name": head_name, "kwargs": dict(head_kwargs), "weights": HEAD_FILE,
                 "num_outputs": int(getattr(head, "num_outputs", 1))},
        "prior": float(prior),
        "metadata": metadata.to_dict() if metadata is not None else None,
        "combiner": combiner,
    }
    path = assets_dir / MODEL_FILE
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def load_visiomel_model(assets_dir: "str | Path", device: "str | torch.device" = "cpu") -> VisioMelModel:
    """Read a model written by :func:`save_visiomel_model` (``yaml.safe_load``, ``weights_only``)."""
    from medmeta.backbones import create_backbone

    assets_dir = Path(assets_dir)
    path = assets_dir / MODEL_FILE
    if not path.is_file():
        raise MissingDataError(f"VisioMel model: {path} does not exist (train one with train_visiomel)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or config.get("format") != "medmeta-visiomel-1":
        raise DataFormatError(f"VisioMel model: {path} is not a medmeta-visiomel-1 model file")
    backbone = create_backbone(config["backbone"]["name"])
    backbone.load_weights(assets_dir / config["backbone"]["weights"])
    head_cfg = config["head"]
    head = create_mil_head(head_cfg["name"], backbone.num_features, int(head_cfg["num_outputs"]), **head_cfg["kwargs"])
    state = load_torch_file(assets_dir / head_cfg["weights"], "VisioMel head weights")
    head.load_state_dict(state)
    meta = MetadataEncoder.from_dict(config["metadata"]) if config.get("metadata") else None
    model = VisioMelModel(
        backbone=backbone.eval(),
        head=head.eval(),
        tiling=dict(config["tiling"]),
        max_tiles=int(config["max_tiles"]),
        prior=float(config["prior"]),
        mean=tuple(config["normalization"]["mean"]),
        std=tuple(config["normalization"]["std"]),
        metadata=meta,
        combiner=config.get("combiner"),
        config=config,
    )
    return model.to(device)


# ---- training ----------------------------------------------------------------------------
def train_visiomel(
    table: "pd.DataFrame | str | Path",
    slide_dir: "str | Path",
    assets_dir: "str | Path",
    cache_dir: "str | Path",
    label_column: str = "relapse",
    backbone: "str | nn.Module" = "resnet18",
    backbone_weights: Optional[str] = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    tiling: Optional[dict[str, Any]] = None,
    max_tiles: int = 512,
    head: str = "abmil",
    head_kwargs: Optional[dict[str, Any]] = None,
    epochs: int = 30,
    lr: float = 1e-3,
    metadata_kinds: Optional[dict[str, str]] = None,
    folds: int = 3,
    seed: int = 0,
    device: "str | torch.device | None" = None,
    num_workers: int = 0,
    on_error: str = "skip",
) -> VisioMelModel:
    """Embed the training slides (cached), train a MIL head for ``relapse`` and save the model.

    With ``metadata_kinds`` (e.g. ``{"age": "age_bin", "sex": "sex", "body_site":
    "categorical", "melanoma_history": "yes_no"}``) a logistic regression combines the MIL
    logit with the encoded metadata; it is fitted on out-of-fold MIL logits (``folds``-fold
    cross-fitting) so the combiner does not trust an overfitted in-sample score.
    """
    from sklearn.linear_model import LogisticRegression

    from medmeta.adapters.slides.dataset import SlideTaskSource
    from medmeta.backbones import create_backbone

    tiling = dict(tiling or {"tile_size": 224, "mpp": 1.0, "min_tissue": 0.5})
    head_kwargs = dict(head_kwargs or {})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bb = create_backbone(backbone, pretrained=backbone_weights) if isinstance(backbone, str) else backbone
    bb = bb.to(device).eval()
    transform = TileTransform(mean, std)
    source = SlideTaskSource(
        table, slide_dir, label_column, bb, cache_dir, tiling=tiling, classes=[0, 1],
        metadata_columns=list(metadata_kinds or {}), max_tiles=max_tiles, seed=seed,
        dataset_id="visiomel", task_name=label_column, on_error=on_error, device=device,
        transform=transform, num_workers=num_workers,
    )
    if len(source) < 2 or len(np.unique(source.labels)) < 2:
        raise ValueError(f"train_visiomel: need slides of both classes; have {len(source)} usable slides")
    bags = source.read_images(range(len(source)))
    labels = source.episode_labels(range(len(source)))

    def fit(positions: np.ndarray, fold_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold_seed)
            model = create_mil_head(head, bags.dim, source.description, **head_kwargs).to(device)
        train_mil(model, bags[positions], labels[positions], source.description, epochs=epochs, lr=lr,
                  seed=fold_seed, device=device)
        return model

    final = fit(np.arange(len(source)), seed)
    encoder, combiner = None, None
    if metadata_kinds:
        encoder = MetadataEncoder(dict(metadata_kinds)).fit(source.metadata)
        meta = encoder.transform(source.metadata)
        oof = np.zeros(len(source))
        rng = np.random.default_rng(seed)
        fold_of = rng.permutation(len(source)) % max(2, folds)
        for k in range(max(2, folds)):
            test = np.flatnonzero(fold_of == k)
            train = np.flatnonzero(fold_of != k)
            if len(np.unique(source.labels[train])) < 2 or len(test) == 0:
                oof[test] = 0.0
                continue
            oof[test] = predict_mil(fit(train, seed + k + 1), bags[test]).numpy().ravel()
        lr_model = LogisticRegression(C=1.0, max_iter=1000).fit(np.column_stack([oof, meta]), source.labels)
        combiner = {"mil": float(lr_model.coef_[0, 0]), "meta": [float(v) for v in lr_model.coef_[0, 1:]],
                    "bias": float(lr_model.intercept_[0])}
    prior = float(source.labels.mean())
    save_visiomel_model(assets_dir, bb, final, head, head_kwargs, tiling, max_tiles, prior, mean, std, encoder, combiner)
    return load_visiomel_model(assets_dir, device)


# ---- inference ---------------------------------------------------------------------------
def predict_slide(
    model: VisioMelModel,
    slide_path: "str | Path",
    max_tiles: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: "str | torch.device | None" = None,
    backend: str = "auto",
) -> tuple[float, int]:
    """MIL logit of one slide and the number of tiles used (tiles sampled down to ``max_tiles``)."""
    grid = tile_slide(slide_path, backend=backend, **model.tiling)
    limit = model.max_tiles if max_tiles is None else int(max_tiles)
    grid = grid.sample(max(1, limit), seed=seed)
    feats = embed_tiles(slide_path, grid, model.backbone, batch_size=batch_size, num_workers=num_workers,
                        device=device, transform=model.transform(), backend=backend)
    logit = predict_mil(model.head, Bags([feats])).reshape(-1)[0]
    return float(logit), len(grid)


@dataclass
class _Pace:
    """Running estimate of seconds per slide: a fixed part plus a part per tile."""

    per_tile: Optional[float] = None
    overhead: Optional[float] = None

    def update(self, seconds: float, tiles: int, tiling_seconds: float) -> None:
        per_tile = max(seconds - tiling_seconds, 1e-6) / max(tiles, 1)
        self.per_tile = per_tile if self.per_tile is None else 0.7 * self.per_tile + 0.3 * per_tile
        self.overhead = tiling_seconds if self.overhead is None else 0.7 * self.overhead + 0.3 * tiling_seconds

    def tiles_allowed(self, seconds: float) -> Optional[int]:
        if self.per_tile is None:
            return None
        return int((seconds - (self.overhead or 0.0)) / self.per_tile)


def run(
    data_dir: "str | Path",
    assets_dir: "str | Path",
    output: "str | Path",
    report: "str | Path | None" = None,
    time_budget: float = 7.5 * 3600,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    max_tiles: Optional[int] = None,
    min_tiles: int = 8,
    seed: int = 0,
    backend: str = "auto",
    clip: float = 1e-3,
) -> pd.DataFrame:
    """Predict every slide of ``submission_format.csv`` and write ``output`` (and the report).

    Never logs data values: progress lines carry only the slide number. Returns the submission.
    """
    start = time.monotonic()
    deadline = start + float(time_budget)
    data_dir, output = Path(data_dir), Path(output)
    report_path = Path(report) if report is not None else output.with_name(output.stem + "_report.json")
    fmt_path, meta_path = data_dir / "submission_format.csv", data_dir / "test_metadata.csv"
    if not fmt_path.is_file():
        raise MissingDataError(f"VisioMel runner: {fmt_path} does not exist")
    fmt = pd.read_csv(fmt_path, dtype={"filename": str})
    if "filename" not in fmt.columns or len(fmt.columns) != 2:
        raise DataFormatError(f"VisioMel runner: {fmt_path} must have columns 'filename' and one target; it has {list(fmt.columns)}")
    target = fmt.columns[1]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = load_visiomel_model(assets_dir, dev)
    fallback = float(np.clip(model.prior, clip, 1 - clip))
    notes: list[str] = []
    meta_rows: dict[str, np.ndarray] = {}
    if model.metadata is not None and model.combiner is not None:
        if not meta_path.is_file():
            notes.append(f"{meta_path.name} missing: predictions use the slides only")
        else:
            meta = pd.read_csv(meta_path, dtype={"filename": str})
            try:
                if "filename" not in meta.columns:
                    raise DataFormatError(f"{meta_path.name}: no 'filename' column")
                encoded = model.metadata.transform(meta)
                meta_rows = {str(f): encoded[i] for i, f in enumerate(meta["filename"])}
            except ValueError as err:
                notes.append(f"metadata unusable ({err}): predictions use the slides only")
    log.info("VisioMel runner: %d slides to predict, budget %.0f s, device %s", len(fmt), time_budget, dev.type)
    pace = _Pace()
    cap = model.max_tiles if max_tiles is None else int(max_tiles)
    probs: list[float] = []
    entries: list[dict[str, Any]] = []
    n = len(fmt)
    for i, name in enumerate(fmt["filename"].astype(str)):
        t0 = time.monotonic()
        entry: dict[str, Any] = {"filename": name}
        remaining = deadline - t0
        budget_here = remaining / (n - i)
        allowed = pace.tiles_allowed(budget_here * 0.85)
        limit = cap if allowed is None else max(min_tiles, min(cap, allowed))
        too_late = pace.per_tile is not None and remaining < (pace.overhead or 0.0) + min_tiles * pace.per_tile
        if remaining <= 0 or too_late:
            entry.update(status="skipped", reason="time budget exhausted", probability=fallback)
            probs.append(fallback)
            entries.append(entry)
            log.info("slide %d/%d processed", i + 1, n)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                path = data_dir / name
                if not path.is_file():
                    raise MissingDataError(f"slide file {name} is listed in the format but missing from the data folder")
                t_tile = time.monotonic()
                grid = tile_slide(path, backend=backend, **model.tiling)
                tiling_seconds = time.monotonic() - t_tile
                available = len(grid)
                grid = grid.sample(max(1, limit), seed=seed)
                feats = embed_tiles(path, grid, model.backbone, batch_size=batch_size, num_workers=num_workers,
                                    device=dev, transform=model.transform(), backend=backend)
                logit = float(predict_mil(model.head, Bags([feats])).reshape(-1)[0])
                row = meta_rows.get(name)
                if model.combiner is not None and meta_rows and row is None:
                    entry["note"] = "no metadata row: slide-only prediction"
                p = float(np.clip(model.probability(logit, row), clip, 1 - clip))
                pace.update(time.monotonic() - t0, len(grid), tiling_seconds)
                entry.update(status="ok", tiles=len(grid), tiles_available=available, sampled=len(grid) < available,
                             probability=p)
            except Exception as err:  # per-slide failure: record, fall back, keep going
                p = fallback
                entry.update(status="failed", reason=f"{type(err).__name__}: {err}", probability=p)
        if caught:
            entry["warnings"] = [str(w.message) for w in caught][:5]
        entry["seconds"] = round(time.monotonic() - t0, 3)
        probs.append(p)
        entries.append(entry)
        log.info("slide %d/%d processed", i + 1, n)
    submission = pd.DataFrame({"filename": fmt["filename"].astype(str), target: probs})[list(fmt.columns)]
    validate_submission(submission, fmt)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, submission.to_csv(index=False))
    report_obj = {
        "output": str(output),
        "seconds": round(time.monotonic() - start, 3),
        "time_budget": time_budget,
        "fallback_probability": fallback,
        "notes": notes,
        "slides": entries,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report_path, json.dumps(report_obj, indent=1))
    log.info("VisioMel runner: wrote %s (details in %s)", output.name, report_path.name)
    return submission


def export_submission(dest: "str | Path", assets_dir: "str | Path") -> Path:
    """Lay out a submission folder: ``main.py`` (the template) and ``assets/`` (the model)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TEMPLATE_PATH, dest / "main.py")
    target = dest / "assets"
    if Path(assets_dir).resolve() != target.resolve():
        shutil.copytree(assets_dir, target, dirs_exist_ok=True)
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m medmeta.adapters.slides.visiomel --data-dir data --assets assets``."""
    parser = argparse.ArgumentParser(prog="medmeta-visiomel", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="folder with the slides and the two CSV files")
    parser.add_argument("--assets", default="assets", help="folder with the saved model")
    parser.add_argument("--output", default="submission.csv")
    parser.add_argument("--report", default=None, help="per-slide report (JSON); default <output>_report.json")
    parser.add_argument("--time-budget", type=float, default=7.5 * 3600, help="seconds for the whole run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-tiles", type=int, default=None, help="tiles per slide (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    # Library loggers may mention slide properties (data values): keep them quiet here.
    logging.getLogger("medmeta").setLevel(logging.WARNING)
    log.setLevel(args.log_level.upper())
    # torch's CPU threads ($MEDMETA_NUM_THREADS or this process's share), then the run; a missing or
    # invalid data folder or model: one clear line, exit status 2
    exit_on_user_error("medmeta-visiomel", apply_num_threads, workers=args.num_workers)
    exit_on_user_error(
        "medmeta-visiomel", run,
        args.data_dir, args.assets, args.output, report=args.report, time_budget=args.time_budget,
        device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
        max_tiles=args.max_tiles, seed=args.seed, backend=args.backend,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
