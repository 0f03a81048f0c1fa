"""Checkpoints that survive a kill at any moment and resume to the same trajectory.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python types, so it is
read back with ``torch.load(weights_only=True)`` (no pickled code). It carries the model,
optimiser and scheduler states, the step, the early-stopping state (best metric, rounds without
improvement), the episode stream state (the next global episode number: with counter-based
episode RNG this alone fixes every later episode) and the torch / CUDA / numpy / Python RNG
states, stored as tensors and lists.

Writes are atomic: the file is written to a temporary name in the same folder, flushed to disk
and moved over the old one with ``os.replace``, so a reader sees the old or the new checkpoint,
never half of one.

A ``fingerprint`` (learner, backbone, parameter shapes, episode settings, tasks) is stored
with every checkpoint; :func:`check_compatible` compares it with the current run before any
training starts and names every field that differs.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from medmeta.io import atomic_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "IncompatibleCheckpointError",
    "atomic_torch_save",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "model_fingerprint",
    "check_compatible",
    "find_backbone_prefix",
    "backbone_state_dict",
]

CHECKPOINT_FORMAT = "medmeta-checkpoint"
CHECKPOINT_VERSION = 1


class IncompatibleCheckpointError(ValueError):
    """A checkpoint does not fit the run that tries to resume from it."""


def atomic_torch_save(obj: Any, path: "str | Path") -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return path


def load_checkpoint(path: "str | Path") -> dict[str, Any]:
    """Read a medmeta checkpoint with ``weights_only=True``; clear errors for wrong files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IncompatibleCheckpointError(
            f"checkpoint {path}: cannot be read with torch.load(weights_only=True) ({err}); "
            f"is it a medmeta checkpoint (last.pt / best.pt)?"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise IncompatibleCheckpointError(
            f"checkpoint {path}: not a medmeta checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}); "
            f"to start from plain backbone weights use backbone.pretrained={path}"
        )
    if int(obj.get("version", -1)) != CHECKPOINT_VERSION:
        raise IncompatibleCheckpointError(
            f"checkpoint {path}: format version {obj.get('version')} but this medmeta reads version "
            f"{CHECKPOINT_VERSION}"
        )
    return obj


# RNG states as tensors and plain types ------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states, ``weights_only``-safe."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    pyst = state["python"]
    random.setstate((int(pyst["version"]), tuple(int(v) for v in pyst["state"].tolist()), pyst["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].to(torch.uint8).cpu(), device=i)


# Compatibility --------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Parameter and buffer names with their shapes (what a state dict must match)."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _describe(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in current:
                out.append(f"{where}: in the checkpoint ({_describe(saved[key])}) but not in this run")
            elif key not in saved:
                out.append(f"{where}: in this run ({_describe(current[key])}) but not in the checkpoint")
            else:
                out.extend(_differences(saved[key], current[key], where))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    if saved != current:
        return [f"{prefix}: checkpoint has {_describe(saved)}, this run has {_describe(current)}"]
    return []


def check_compatible(checkpoint: Mapping[str, Any], fingerprint: Mapping[str, Any], path: "str | Path" = "") -> None:
    """Raise :class:`IncompatibleCheckpointError` naming every fingerprint field that differs.

    The parameter shapes are summarised (first differences only) so the message stays readable.
    """
    saved = checkpoint.get("fingerprint")
    if not isinstance(saved, Mapping):
        raise IncompatibleCheckpointError(f"checkpoint {path}: has no fingerprint to compare with this run")
    diffs = _differences(saved, fingerprint, "")
    if diffs:
        shown = diffs[:12]
        more = f"\n  ... and {len(diffs) - len(shown)} more" if len(diffs) > len(shown) else ""
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not match this run ({len(diffs)} difference(s)); resume with the "
            f"settings it was written with, or start a fresh run (trainer.resume=false, or a new "
            f"hydra.run.dir):\n  " + "\n  ".join(shown) + more
        )


def find_backbone_prefix(model: nn.Module, backbone: nn.Module) -> Optional[str]:
    """The state-dict prefix under which ``backbone`` sits inside ``model`` (``""`` if equal)."""
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}." if name else ""
    return None


def backbone_state_dict(model_state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The backbone's entries of a learner state dict, with ``prefix`` removed."""
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
