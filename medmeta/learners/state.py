"""The one checkpoint format of medmeta: a learner's state, and what a training run adds to it.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values, written atomically
(temporary file, fsync, ``os.replace``) and read with ``weights_only=True`` (through
:func:`medmeta.io.load_torch_file`), so loading never runs pickled code. Every checkpoint holds::

    format, version     "medmeta-checkpoint", 2
    architecture        learner class, backbone name (and in_chans), feature size
    model               the learner's state_dict
    backbone_prefix     where the backbone's weights sit in ``model`` ("backbone.")
    optimizer, scheduler, extra, config     optional (None / {})

:func:`save_learner` writes exactly this; the training loop
(:class:`medmeta.training.loop.TrainingLoop`) writes the same dict plus its resume fields
(step, early stopping, data stream, RNG states, fingerprint). :func:`read_checkpoint` reads
every checkpoint, including the two formats of earlier medmeta versions (``medmeta-learner``
files of ``save_learner`` and version-1 training checkpoints), so one file works everywhere:
``load_learner``, resuming, and ``medmeta-evaluate checkpoint=...``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medmeta.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "save_learner",
    "load_learner",
    "learner_architecture",
    "learner_checkpoint",
    "write_checkpoint",
    "read_checkpoint",
    "check_learner_fits",
    "find_backbone_prefix",
    "backbone_state_dict",
]

CHECKPOINT_FORMAT = "medmeta-checkpoint"
CHECKPOINT_VERSION = 2
_LEGACY_LEARNER_FORMAT = "medmeta-learner"  # save_learner files of medmeta <= this version's predecessor

def learner_architecture(learner: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: learner class, backbone name (and input channels), feature size."""
    backbone = getattr(learner, "backbone", None)
    arch: dict[str, Any] = {
        "learner": type(learner).__name__,
        "backbone": str(getattr(backbone, "name", type(backbone).__name__ if backbone is not None else "")),
        "num_features": int(getattr(learner, "num_features", getattr(backbone, "num_features", 0)) or 0),
    }
    in_chans = getattr(backbone, "in_chans", None)
    if isinstance(in_chans, int):
        arch["in_chans"] = in_chans
    return arch


def find_backbone_prefix(model: nn.Module, backbone: Optional[nn.Module]) -> Optional[str]:
    """The state-dict prefix under which ``backbone`` sits inside ``model`` (``""`` if equal)."""
    if backbone is None:
        return None
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}." if name else ""
    return None


def backbone_state_dict(model_state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The backbone's entries of a learner state dict, with ``prefix`` removed."""
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


_PLAIN = (int, float, bool, str, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    """``extra`` / ``config`` must survive ``weights_only`` loading: tensors, numbers, strings, lists, dicts."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"save_learner: {where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"save_learner: {where} is a {type(value).__name__}; it may only hold tensors, numbers, "
        f"strings, None, lists and dicts (what weights_only loading reads back)"
    )


def learner_checkpoint(
    learner: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    extra: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    backbone: Optional[nn.Module] = None,
) -> dict[str, Any]:
    """The checkpoint dict of ``learner`` (see the module doc); ``backbone`` defaults to ``learner.backbone``.

    ``extra`` and ``config`` must hold tensors and plain Python values (numbers, strings,
    lists, dicts), which is what ``weights_only`` loading accepts.
    """
    extra = dict(extra or {})
    config = dict(config or {})
    _check_plain(extra, "extra")
    _check_plain(config, "config")
    if backbone is None:
        backbone = getattr(learner, "backbone", None)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": learner_architecture(learner),
        "model": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
        "backbone_prefix": find_backbone_prefix(learner, backbone),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "extra": extra,
        "config": config,
    }


def write_checkpoint(payload: Any, path: "str | Path") -> Path:
    """``torch.save(payload)`` to ``path`` atomically (old file or new file, never half of one)."""
    from medmeta.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = _WriteErrors(handle)
        try:
            torch.save(payload, writer)  # type: ignore[arg-type]  # a binary file by duck typing
        except Exception as err:
            if writer.error is not None:  # torch's zip writer reports a failed write as "unexpected pos"
                raise writer.error from err
            raise
    return path


class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the first ``OSError`` of a write (a full disk),
    which torch would otherwise replace by a ``RuntimeError`` without the cause."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return int(self.handle.write(data))
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _from_legacy_learner(obj: dict[str, Any]) -> dict[str, Any]:
    """A ``medmeta-learner`` file (old ``save_learner``) in the current layout."""
    state = obj.get("state_dict") or {}
    prefix = "backbone." if any(str(k).startswith("backbone.") for k in state) else None
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": dict(obj.get("architecture") or {}),
        "model": state,
        "backbone_prefix": prefix,
        "optimizer": obj.get("optimizer"),
        "scheduler": None,
        "extra": dict(obj.get("extra") or {}),
        "config": {},
    }


def read_checkpoint(path: "str | Path") -> dict[str, Any]:
    """Read any medmeta checkpoint with ``weights_only=True``, in the current layout.

    Files of earlier versions (``save_learner``'s ``medmeta-learner`` format, version-1
    training checkpoints) are converted. Raises :class:`~medmeta.errors.CheckpointError` for
    files that are not medmeta checkpoints, :class:`~medmeta.errors.MissingDataError` (a
    ``FileNotFoundError``) when the file does not exist.
    """
    from medmeta.io import load_torch_file

    path = Path(path)
    obj = load_torch_file(path, "checkpoint", error=CheckpointError)
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt == _LEGACY_LEARNER_FORMAT:
        return _from_legacy_learner(obj)
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a medmeta checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}, "
            f"as save_learner and training runs write); to start from plain backbone weights use "
            f"backbone.pretrained={path}"
        )
    version = int(obj.get("version", -1))
    if version not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(
            f"checkpoint {path}: format version {obj.get('version')} but this medmeta reads versions 1 and "
            f"{CHECKPOINT_VERSION}"
        )
    obj.setdefault("architecture", {})
    obj.setdefault("extra", {})
    obj.setdefault("config", {})
    obj.setdefault("scheduler", None)
    obj["version"] = CHECKPOINT_VERSION
    return obj


def check_learner_fits(checkpoint: Mapping[str, Any], learner: nn.Module, path: "str | Path" = "", strict: bool = True) -> None:
    """Raise :class:`~medmeta.errors.CheckpointError` naming the learner class, backbone, missing and
    unexpected keys and shape mismatches when ``checkpoint`` does not fit ``learner``."""
    saved_arch = dict(checkpoint.get("architecture") or {})
    own_arch = learner_architecture(learner)
    state = checkpoint.get("model")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: holds no learner weights ('model')")
    own = learner.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    arch_diff = {k: (saved_arch[k], v) for k, v in own_arch.items() if k in saved_arch and saved_arch[k] != v}
    if resized or arch_diff or (strict and (missing or unexpected)):
        parts = [f"checkpoint {path} does not fit this learner"]
        for k, (saved, mine) in arch_diff.items():
            parts.append(f"{k}: checkpoint {saved!r}, learner {mine!r}")
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
        if resized:
            shown = ", ".join(f"{k}: checkpoint {a} vs learner {b}" for k, a, b in resized[:5])
            parts.append(f"shape mismatches {shown}{' ...' if len(resized) > 5 else ''} ({len(resized)})")
        raise CheckpointError("; ".join(parts))


def save_learner(
    path: "str | Path",
    learner: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Optional[dict[str, Any]] = None,
    config: Optional[dict[str, Any]] = None,
) -> Path:
    """Write the learner's checkpoint (and the optimiser's state, ``extra``, ``config``) atomically.

    ``extra`` must hold tensors and plain Python values (numbers, strings, lists, dicts), which
    is what ``weights_only`` loading accepts (e.g. epoch, step, best score, RNG state tensors).
    The file is read by :func:`load_learner`, by ``medmeta-evaluate checkpoint=...`` and by
    :func:`medmeta.training.checkpoint.load_checkpoint`.
    """
    payload = learner_checkpoint(learner, optimizer, extra=extra, config=config)
    return write_checkpoint(payload, path)


def load_learner(
    path: "str | Path",
    learner: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a medmeta checkpoint into ``learner`` (and ``optimizer``); returns its ``extra`` dict.

    Raises :class:`~medmeta.errors.CheckpointError` (a ``ValueError``) naming the learner class,
    backbone, missing and unexpected keys and shape mismatches when the architecture differs.
    """
    ckpt = read_checkpoint(path)
    check_learner_fits(ckpt, learner, path, strict)
    learner.load_state_dict(ckpt["model"], strict=strict)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path}: has no optimizer state to load")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit the optimizer ({err})") from err
    return dict(ckpt.get("extra") or {})
