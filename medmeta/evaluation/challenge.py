"""The L2L challenge interface: labelled support set + unlabelled query set -> query predictions.

As in the MICCAI 2023 Learn2Learn containers, a submission receives one task at a time: a
labelled support set, an unlabelled query set, the task kind and the class names, and returns
predictions (and probabilities) for the query set. Inputs, all read without pickle:

* an image folder with a CSV (``labels.csv``, or the CSV file itself; image paths relative to
  it): a ``file`` column, and for the support set a ``label`` column (class name, or class
  position) or, for multi-label tasks, a ``labels`` column of ``;``-separated class names or one
  0/1 column per class. A query folder without a CSV uses every image in it, sorted by name.
* tensors in a ``.safetensors`` file, or a ``torch.save`` file of tensors only (loaded with
  ``weights_only=True``): ``support_images`` ``(N, C, H, W)`` (float, or uint8 scaled to [0, 1]
  and normalised), ``support_labels`` in the episode encoding (:mod:`medmeta.tasks`) and
  ``query_images``; one file may hold all three.

Output: a CSV with ``index``, ``file`` (when known), ``prediction`` (class name; ``;``-joined
names for multi-label) and one ``prob_<class>`` column per class; optionally the probability
tensor as ``.safetensors`` / ``.pt``.

``convert`` turns the organisers' pickled TorchCross ``Task`` into such a tensor file. Pickles
can run arbitrary code, so it refuses to read one unless ``--trust-pickle`` is given.

Usage::

    python -m medmeta.evaluation.challenge predict --support support/ --query query/ \
        --task-kind multiclass --classes "benign,malignant,normal" \
        --learner protonet --backbone resnet18 --backbone-weights bb.pt --out preds.csv
    python -m medmeta.evaluation.challenge convert --trust-pickle task.pkl --out task.safetensors
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medmeta.data.transforms import (
    NORMALIZATIONS,
    ImageTransform,
    check_normalize,
    parse_size,
    read_image_file,
    uint8_to_float,
)
from medmeta.errors import (
    ConfigError,
    DataFormatError,
    MissingDataError,
    MissingDependencyError,
    UntrustedFileError,
    exit_on_user_error,
)
from medmeta.io import load_torch_file
from medmeta.learners.base import Learner
from medmeta.learners.heads import task_probabilities
from medmeta.modes import module_mode
from medmeta.tasks import TaskDescription, TaskTarget
from medmeta.threads import apply_num_threads

__all__ = [
    "main",
    "parse_task_kind",
    "make_description",
    "load_tensor_file",
    "save_tensor_file",
    "load_image_set",
    "encode_label_names",
    "predict_query",
    "write_predictions",
    "run_challenge",
    "convert_torchcross_task",
]

_KINDS = {
    "multiclass": TaskTarget.MULTICLASS_CLASSIFICATION,
    "binary": TaskTarget.BINARY_CLASSIFICATION,
    "multilabel": TaskTarget.MULTILABEL_CLASSIFICATION,
    "ordinal": TaskTarget.ORDINAL_REGRESSION,
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_NORMALIZE_ALIASES = {"medimeta": "official"}
"""Former CLI names of :data:`~medmeta.data.transforms.NORMALIZATIONS` entries, still accepted."""


def _normalize_name(normalize: str) -> str:
    """A :data:`~medmeta.data.transforms.NORMALIZATIONS` key (``medimeta`` is the former name of
    ``official``)."""
    name = _NORMALIZE_ALIASES.get(normalize, normalize)
    check_normalize(name, where="--normalize")
    return name


def parse_task_kind(kind: str) -> TaskTarget:
    """``multiclass|binary|multilabel|ordinal`` or a :class:`TaskTarget` name."""
    key = str(kind).strip().lower().replace("-", "").replace("_", "")
    if key in _KINDS:
        return _KINDS[key]
    return TaskTarget.parse(kind, where="--task-kind")


def make_description(kind: "str | TaskTarget", classes: Sequence[str], task_identifier: str = "challenge task") -> TaskDescription:
    """The task description of a challenge task (class names in label order)."""
    target = parse_task_kind(kind) if not isinstance(kind, TaskTarget) else kind
    classes = [str(c).strip() for c in classes if str(c).strip()]
    if len(classes) < 2 and target is not TaskTarget.MULTILABEL_CLASSIFICATION:
        raise ConfigError(f"--classes: a {target.value} task needs at least 2 class names, got {classes}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"--classes: duplicate class names in {classes}")
    if target is TaskTarget.BINARY_CLASSIFICATION and len(classes) != 2:
        raise ConfigError(f"--classes: a binary task needs exactly 2 class names (negative, positive), got {classes}")
    return TaskDescription(target, tuple(classes), task_identifier, "challenge")


# -- tensor files ------------------------------------------------------------------------------
def load_tensor_file(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (and string metadata) from ``.safetensors`` or a tensors-only ``torch.save`` file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"tensor file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise MissingDependencyError(f"{path}: reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    obj = load_torch_file(path, "tensor file")
    if not isinstance(obj, dict):
        raise DataFormatError(f"tensor file {path}: expected a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    meta = obj.get("metadata", {})
    meta = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return tensors, meta


def save_tensor_file(path: Union[str, Path], tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> Path:
    """Write tensors atomically: ``.safetensors`` (with string metadata) or ``torch.save``."""
    from medmeta.io import write_bytes_atomic

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        return write_bytes_atomic(path, save(tensors, metadata=metadata))
    buf = io.BytesIO()
    torch.save({**tensors, **({"metadata": dict(metadata)} if metadata else {})}, buf)
    return write_bytes_atomic(path, buf.getvalue())


def _normalize_images(images: Tensor, where: str, normalize: str) -> Tensor:
    """Tensor-file images: uint8 ``(N, [C,] H, W)`` scaled and normalised as every source does
    (:func:`~medmeta.data.transforms.uint8_to_float`); float images are used as given."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataFormatError(f"{where}: expected images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return uint8_to_float(images, _normalize_name(normalize))
    if not images.dtype.is_floating_point:
        raise DataFormatError(f"{where}: expected float or uint8 images, got {images.dtype}")
    return images.float()


# -- image folders -----------------------------------------------------------------------------
def _csv_of(path: Path) -> Optional[Path]:
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir():
        for name in ("labels.csv", "support.csv", "query.csv"):
            if (path / name).is_file():
                return path / name
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1:
            return csvs[0]
        if len(csvs) > 1:
            raise DataFormatError(f"{path}: several CSV files {[c.name for c in csvs]}; pass the CSV file itself")
    return None


def encode_label_names(rows: list[dict[str, str]], description: TaskDescription, where: str) -> Tensor:
    """Episode labels of CSV rows (see module doc)."""
    classes = list(description.classes)
    target = description.task_target

    def position(value: Optional[str], i: int) -> int:
        if value is None:  # a row shorter than the header
            raise DataFormatError(f"{where}, row {i + 2}: no label (the row has fewer cells than the header)")
        value = value.strip()
        if value in classes:
            return classes.index(value)
        if value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
            return int(value)
        raise DataFormatError(f"{where}, row {i + 2}: label {value!r} is not one of the classes {classes} (or a position 0..{len(classes) - 1})")

    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        out = np.zeros((len(rows), len(classes)), dtype=np.float32)
        if rows and all(c in rows[0] for c in classes):
            for i, row in enumerate(rows):
                for j, c in enumerate(classes):
                    v = row[c].strip()
                    if v not in ("0", "1", "0.0", "1.0"):
                        raise DataFormatError(f"{where}, row {i + 2}: column {c!r} must be 0 or 1, got {v!r}")
                    out[i, j] = float(v)
        elif rows and "labels" in rows[0]:
            for i, row in enumerate(rows):
                for name in filter(None, (s.strip() for s in row["labels"].split(";"))):
                    out[i, position(name, i)] = 1.0
        else:
            raise DataFormatError(f"{where}: a multi-label CSV needs a 'labels' column or one 0/1 column per class {classes}")
        return torch.from_numpy(out)
    if rows and "label" not in rows[0]:
        raise DataFormatError(f"{where}: the support CSV needs a 'label' column")
    pos = np.asarray([position(row["label"], i) for i, row in enumerate(rows)], dtype=np.int64)
    if target is TaskTarget.BINARY_CLASSIFICATION:
        return torch.from_numpy(pos.astype(np.float32))[:, None]
    return torch.from_numpy(pos)


def load_image_set(
    path: Union[str, Path],
    description: Optional[TaskDescription],
    with_labels: bool,
    channels: int = 3,
    image_size: Optional[int] = None,
    normalize: str = "official",
) -> tuple[Tensor, Optional[Tensor], list[str]]:
    """Images (normalised float ``(N, C, H, W)``), episode labels (support) and file names.

    Images are converted like every MedIMeta source's
    (:class:`~medmeta.data.transforms.ImageTransform`: RGB -> grey with PIL's formula, grey
    repeated for RGB, PIL bilinear resize to ``image_size``, then ``normalize``).
    """
    transform = ImageTransform(channels, parse_size(image_size), _normalize_name(normalize))
    if with_labels and description is None:
        raise DataFormatError(f"{path}: a labelled support set needs the task description (classes)")
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"{path} does not exist")
    csv_path = _csv_of(path)
    if csv_path is None:
        if with_labels:
            raise DataFormatError(f"{path}: a labelled support set needs a CSV with 'file' and 'label' columns")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        rows = [{"file": p.name} for p in files]
        base = path
    else:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        base = csv_path.parent
        if rows and "file" not in rows[0]:
            raise DataFormatError(f"{csv_path}: needs a 'file' column (image path relative to the CSV), has {list(rows[0])}")
    if not rows:
        raise DataFormatError(f"{path}: no images")
    where = str(csv_path or path)
    from medmeta.io import contained_path

    arrays = [read_image_file(contained_path(base, r.get("file"), f"{where}, row {i + 2}, column 'file'"), channels, where)
              for i, r in enumerate(rows)]
    sizes = {a.shape[:2] for a in arrays}
    if image_size is None and len(sizes) != 1:
        raise DataFormatError(f"{path}: images have different sizes {sorted(sizes)[:4]}; pass --image-size")
    images = transform.images(arrays)
    labels = None
    if with_labels and description is not None:
        labels = encode_label_names(rows, description, str(csv_path))
    return images, labels, [r["file"] for r in rows]


def _load_part(
    path: Union[str, Path], part: str, description: Optional[TaskDescription], args: Any
) -> tuple[Tensor, Optional[Tensor], list[str], dict[str, str]]:
    path = Path(path)
    if path.suffix in (".safetensors", ".pt", ".pth"):
        tensors, meta = load_tensor_file(path)
        key = f"{part}_images"
        if key not in tensors:
            raise DataFormatError(f"tensor file {path}: has no {key!r} (it has {sorted(tensors)})")
        images = _normalize_images(tensors[key], f"{path}:{key}", args.normalize)
        labels = tensors.get("support_labels") if part == "support" else None
        if part == "support" and labels is None:
            raise DataFormatError(f"tensor file {path}: has no 'support_labels'")
        return images, labels, [], meta
    images, labels, names = load_image_set(
        path, description, part == "support", channels=args.channels, image_size=args.image_size, normalize=args.normalize
    )
    return images, labels, names, {}


# -- prediction --------------------------------------------------------------------------------
def predict_query(
    learner: Learner,
    support_images: Tensor,
    support_labels: Tensor,
    query_images: Tensor,
    description: TaskDescription,
    device: Optional[Any] = None,
    batch_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Adapt on the support set; return query predictions (episode encoding) and probabilities.

    Probabilities have one column per class (binary tasks: ``[1 - p, p]``). ``batch_size``
    splits the query set into chunks for inductive learners only: a transductive learner
    (``learner.transductive``) uses the unlabelled query set, so it always gets all of it at once.
    """
    from medmeta.learners.heads import check_labels

    check_labels(support_labels, description, where="support labels")
    if len(support_labels) != len(support_images):
        raise DataFormatError(f"support set: {len(support_images)} images but {len(support_labels)} labels")
    if device is None:
        device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    learner.to(device)
    with module_mode(learner, False):
        predictor = learner.adapt(support_images.to(device), support_labels.to(device), description)
        chunks = []
        step = len(query_images) if getattr(learner, "transductive", False) else batch_size or len(query_images)
        for i in range(0, len(query_images), step):
            with torch.no_grad():
                chunks.append(predictor(query_images[i : i + step].to(device)).detach().float().cpu())
    logits = torch.cat(chunks)
    if logits.shape != (len(query_images), description.num_outputs):
        raise ValueError(
            f"{type(learner).__name__} returned logits {tuple(logits.shape)}; expected ({len(query_images)}, {description.num_outputs})"
        )
    probs = task_probabilities(logits, description.task_target)
    target = description.task_target
    if target is TaskTarget.BINARY_CLASSIFICATION:
        return (probs > 0.5).float(), torch.cat([1 - probs, probs], dim=1)
    if target is TaskTarget.MULTILABEL_CLASSIFICATION:
        return (probs > 0.5).float(), probs
    return probs.argmax(dim=1), probs


def write_predictions(
    path: Union[str, Path],
    description: TaskDescription,
    predictions: Tensor,
    probabilities: Tensor,
    files: Sequence[str] = (),
) -> Path:
    """The prediction CSV (atomic): index, file, prediction (class names), prob_<class>."""
    from medmeta.io import write_bytes_atomic

    classes = list(description.classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "file", "prediction", *[f"prob_{c}" for c in classes]])
    target = description.task_target
    for i in range(len(probabilities)):
        if target is TaskTarget.MULTILABEL_CLASSIFICATION:
            pred = ";".join(c for c, v in zip(classes, predictions[i].tolist()) if v >= 0.5)
        elif target is TaskTarget.BINARY_CLASSIFICATION:
            pred = classes[int(predictions[i].item() >= 0.5)]
        else:
            pred = classes[int(predictions[i])]
        writer.writerow([i, files[i] if i < len(files) else "", pred, *[f"{p:.6f}" for p in probabilities[i].tolist()]])
    return write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def run_challenge(
    learner: Learner,
    support: Union[str, Path, tuple[Tensor, Tensor]],
    query: Union[str, Path, Tensor],
    description: TaskDescription,
    out_csv: Union[str, Path],
    probabilities_out: Optional[Union[str, Path]] = None,
    channels: int = 3,
    image_size: Optional[int] = None,
    normalize: str = "official",
    device: Optional[Any] = None,
) -> tuple[Tensor, Tensor]:
    """Python API of the challenge command: inputs as paths or tensors, writes the CSV."""
    args = argparse.Namespace(channels=channels, image_size=image_size, normalize=normalize)
    s_labels: Optional[Tensor]
    files: list[str] = []
    if isinstance(support, tuple):
        s_images, s_labels = support
    else:
        s_images, s_labels, _, _ = _load_part(support, "support", description, args)
    if s_labels is None:
        raise DataFormatError(f"{support}: the support set has no labels")
    if isinstance(query, Tensor):
        q_images = query
    else:
        q_images, _, files, _ = _load_part(query, "query", description, args)
    if description.task_target is TaskTarget.BINARY_CLASSIFICATION and s_labels.ndim == 1:
        s_labels = s_labels.reshape(-1, 1)
    if description.task_target.uses_sigmoid:
        s_labels = s_labels.float()
    preds, probs = predict_query(learner, s_images, s_labels, q_images, description, device=device)
    write_predictions(out_csv, description, preds, probs, files)
    if probabilities_out is not None:
        save_tensor_file(probabilities_out, {"probabilities": probs, "predictions": preds.float()})
    return preds, probs


# -- TorchCross pickles ------------------------------------------------------------------------
_TC_TARGETS = {
    1: TaskTarget.MULTICLASS_CLASSIFICATION,
    2: TaskTarget.BINARY_CLASSIFICATION,
    3: TaskTarget.MULTILABEL_CLASSIFICATION,
    4: TaskTarget.ORDINAL_REGRESSION,
    5: TaskTarget.REGRESSION,
    6: TaskTarget.BINARY_SEGMENTATION,
    7: TaskTarget.MULTILABEL_SEGMENTATION,
}


class _Record:
    """Stand-in for TorchCross dataclasses (``Task``, ``TaskDescription``) when unpickling."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state or {})


class _TCTask(_Record):
    pass


class _TCDescription(_Record):
    pass


def _tc_target(value: Any) -> TaskTarget:
    if isinstance(value, str):
        return TaskTarget.parse(value)
    return _TC_TARGETS[int(value)]


class _TrustedTorchCrossUnpickler(pickle.Unpickler):
    """Full unpickling (the user trusts the file) with TorchCross classes mapped to stand-ins, so
    the organisers' pickles load without TorchCross installed."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torchcross"):
            if name == "Task":
                return _TCTask
            if name == "TaskDescription":
                return _TCDescription
            if name == "TaskTarget":
                return _tc_target
        return super().find_class(module, name)


def _stack_part(part: Any, where: str) -> tuple[Tensor, Optional[Tensor]]:
    """(images, labels) of a TorchCross support/query collection."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(p, Tensor) for p in part) and part[0].ndim == 4:
        return part[0], part[1]
    if isinstance(part, Tensor):
        return part, None
    if isinstance(part, (list, tuple)) and part:
        first = part[0]
        if isinstance(first, (tuple, list)) and len(first) == 2:
            images = [x[0] for x in part]
            labels = [torch.as_tensor(x[1]) for x in part]
            if all(isinstance(i, Tensor) for i in images):
                return torch.stack(images), torch.stack(labels)
            if all(isinstance(i, (int, np.integer)) or (isinstance(i, Tensor) and i.ndim == 0) for i in images):
                return torch.as_tensor([int(i) for i in images]), torch.stack(labels)
        if all(isinstance(x, Tensor) for x in part):
            return torch.stack(list(part)), None
    raise DataFormatError(f"{where}: unrecognised TorchCross collection ({type(part).__name__})")


def convert_torchcross_task(path: Union[str, Path], out: Union[str, Path], trust_pickle: bool = False) -> Path:
    """Convert a pickled TorchCross ``Task`` (the L2L organisers' format) to a tensor file.

    Image tasks become ``support_images``, ``support_labels``, ``query_images`` (and
    ``query_labels`` when present) in the episode encoding; presampled index tasks (support and
    query as lists of (index, label)) become a JSON file of indices and labels. Reading a pickle
    runs code from the file, so ``trust_pickle=True`` is required.
    """
    path = Path(path)
    if not trust_pickle:
        raise UntrustedFileError(
            f"{path}: reading a pickle can run arbitrary code; pass --trust-pickle (trust_pickle=True) only "
            f"for files from a source you trust"
        )
    if not path.is_file():
        raise MissingDataError(f"TorchCross task file {path} does not exist")
    with open(path, "rb") as f:
        obj = _TrustedTorchCrossUnpickler(f).load()
    tasks = obj if isinstance(obj, list) else [obj]
    if not tasks or not all(isinstance(t, _TCTask) for t in tasks):
        raise DataFormatError(f"{path}: expected a TorchCross Task (or a list of them), got {type(obj).__name__}")
    converted = []
    for i, task in enumerate(tasks):
        desc = getattr(task, "description", None)
        raw_target = getattr(desc, "task_target", 1)
        target = raw_target if isinstance(raw_target, TaskTarget) else _tc_target(raw_target)
        classes_obj = getattr(desc, "classes", None) or {}
        classes = [str(classes_obj[k]) for k in sorted(classes_obj)] if isinstance(classes_obj, dict) else [str(c) for c in classes_obj]
        s_x, s_y = _stack_part(task.support, f"{path} task {i} support")
        q_x, q_y = _stack_part(task.query, f"{path} task {i} query")
        if s_y is None:
            raise DataFormatError(f"{path} task {i}: the support set has no labels")
        if target.uses_sigmoid:
            s_y = s_y.float().reshape(len(s_y), -1)
            q_y = q_y.float().reshape(len(q_y), -1) if q_y is not None else None
        else:
            s_y = s_y.long().reshape(-1)
            q_y = q_y.long().reshape(-1) if q_y is not None else None
        converted.append((target, classes, s_x, s_y, q_x, q_y, getattr(desc, "task_identifier", None) or "", getattr(desc, "domain_identifier", None) or ""))
    out = Path(out)
    index_tasks = all(c[2].ndim == 1 for c in converted)
    if index_tasks or len(converted) > 1:
        if not index_tasks:
            raise DataFormatError(f"{path}: holds {len(converted)} image tasks; convert one task per file")
        from medmeta.io import write_json_atomic

        return write_json_atomic(
            out,
            {
                "format": "torchcross-index-tasks",
                "tasks": [
                    {
                        "task_target": t.value, "classes": cl, "task_identifier": tid, "domain_identifier": did,
                        "support_indices": sx.tolist(), "support_labels": sy.tolist(),
                        "query_indices": qx.tolist(), "query_labels": None if qy is None else qy.tolist(),
                    }
                    for t, cl, sx, sy, qx, qy, tid, did in converted
                ],
            },
        )
    target, classes, s_x, s_y, q_x, q_y, tid, did = converted[0]
    tensors = {"support_images": s_x, "support_labels": s_y, "query_images": q_x}
    if q_y is not None:
        tensors["query_labels"] = q_y
    meta = {"task_target": target.value, "classes": json.dumps(classes), "task_identifier": tid, "domain_identifier": did}
    return save_tensor_file(out, tensors, meta)


# -- command line ------------------------------------------------------------------------------
def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--option {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _build_learner(args: argparse.Namespace) -> Learner:
    from medmeta.backbones import create_backbone
    from medmeta.learners import create_learner
    from medmeta.learners.state import load_learner

    backbone = create_backbone(args.backbone, pretrained=args.backbone_weights or None, in_chans=args.channels)
    learner = create_learner(args.learner, backbone, **_parse_options(args.option))
    if args.checkpoint:
        load_learner(args.checkpoint, learner)
    return learner


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmeta-challenge", description="L2L challenge interface (see module doc)")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="predict a query set from a labelled support set")
    pr.add_argument("--support", required=True, help="image folder/CSV, or .safetensors/.pt tensor file")
    pr.add_argument("--query", help="image folder/CSV or tensor file (default: the support tensor file)")
    pr.add_argument("--task-kind", help="multiclass, binary, multilabel or ordinal (default: from the tensor file)")
    pr.add_argument("--classes", help="comma-separated class names in label order (default: from the tensor file)")
    pr.add_argument("--learner", required=True, help="learner name (medmeta.learners registry), e.g. protonet")
    pr.add_argument("--backbone", required=True, help="backbone name, e.g. resnet18 or medmeta_conv4")
    pr.add_argument(
        "--backbone-weights",
        help="backbone weights: a tensors-only torch file, or a named offline source such as "
        "imagenet-mobilenetv2 (medmeta.backbones.pretrained.list_pretrained_sources())",
    )
    pr.add_argument("--checkpoint", help="learner checkpoint written by medmeta.learners.save_learner")
    pr.add_argument("--option", action="append", default=[], help="learner option key=value (YAML value)")
    pr.add_argument("--channels", type=int, default=3, choices=(1, 3))
    pr.add_argument("--image-size", type=int, default=None)
    pr.add_argument(
        "--normalize", choices=[*sorted(NORMALIZATIONS), *_NORMALIZE_ALIASES], default="official",
        help="image normalisation (medmeta.data.transforms.NORMALIZATIONS; 'medimeta' is the former name of 'official')",
    )
    pr.add_argument("--device", default=None)
    pr.add_argument("--out", required=True, help="prediction CSV")
    pr.add_argument("--probabilities-out", help="also write probabilities as .safetensors or .pt")
    cv = sub.add_parser("convert", help="convert a pickled TorchCross Task to a tensor file")
    cv.add_argument("pickle_file")
    cv.add_argument("--out", required=True, help=".safetensors or .pt (image tasks); .json (index tasks)")
    cv.add_argument("--trust-pickle", action="store_true", help="I trust this pickle file (it can run code)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> int:
        apply_num_threads()  # torch's CPU threads: $MEDMETA_NUM_THREADS or this process's share
        if args.command == "convert":
            out = convert_torchcross_task(args.pickle_file, args.out, trust_pickle=args.trust_pickle)
            print(f"wrote {out}")
            return 0
        meta: dict[str, str] = {}
        if Path(args.support).suffix in (".safetensors", ".pt", ".pth"):
            _, meta = load_tensor_file(args.support)
        kind = args.task_kind or meta.get("task_target")
        classes = args.classes.split(",") if args.classes else json.loads(meta["classes"]) if "classes" in meta else None
        if kind is None or classes is None:
            raise ConfigError("--task-kind and --classes are required (the inputs do not state them)")
        description = make_description(kind, classes)
        query = args.query or args.support
        learner = _build_learner(args)
        preds, _ = run_challenge(
            learner, args.support, query, description, args.out, args.probabilities_out,
            channels=args.channels, image_size=args.image_size, normalize=args.normalize, device=args.device,
        )
        print(f"wrote {len(preds)} predictions to {args.out}")
        return 0

    return exit_on_user_error("medmeta-challenge", command)


if __name__ == "__main__":
    sys.exit(main())
