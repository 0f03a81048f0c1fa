"""Training checkpoints that survive a kill at any moment and resume to the same trajectory.

A training checkpoint is the one medmeta checkpoint (:mod:`medmeta.learners.state`: format,
architecture, the learner's ``model`` state, backbone prefix, optimiser, scheduler, config)
plus the resume fields: the step, the early-stopping state (best metric, rounds without
improvement), the episode stream state (the next global episode number: with counter-based
episode RNG this alone fixes every later episode) and the torch / CUDA / numpy / Python RNG
states, stored as tensors and lists. So ``last.pt`` / ``best.pt`` load with
:func:`~medmeta.learners.state.load_learner`, and a ``save_learner`` file evaluates with
``medmeta-evaluate checkpoint=...``.

Writes are atomic (:func:`~medmeta.learners.state.write_checkpoint`): a reader sees the old or
the new checkpoint, never half of one. Reads go through
:func:`~medmeta.learners.state.read_checkpoint` (``weights_only`` loading, no pickled code).

A ``fingerprint`` (learner, backbone, parameter shapes, episode settings, tasks) is stored
with every checkpoint; :func:`check_compatible` compares it with the current run before any
training starts and names every field that differs.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from medmeta.errors import CheckpointError
from medmeta.learners.state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    backbone_state_dict,
    find_backbone_prefix,
    read_checkpoint,
    write_checkpoint,
)

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
    "checkpoint_backbone",
    "restore_learner",
]

IncompatibleCheckpointError = CheckpointError
"""The former name of :class:`medmeta.errors.CheckpointError` (kept for callers that import it)."""

atomic_torch_save = write_checkpoint
"""``torch.save`` atomically (also for plain weight files such as ``best_backbone.pt``)."""

load_checkpoint = read_checkpoint
"""Read any medmeta checkpoint (training runs' and ``save_learner``'s) with ``weights_only=True``."""


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
    """Raise :class:`~medmeta.errors.CheckpointError` naming every fingerprint field that differs.

    The parameter shapes are summarised (first differences only) so the message stays readable.
    """
    saved = checkpoint.get("fingerprint")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint {path}: has no fingerprint to compare with this run")
    diffs = _differences(saved, fingerprint, "")
    if diffs:
        shown = diffs[:12]
        more = f"\n  ... and {len(diffs) - len(shown)} more" if len(diffs) > len(shown) else ""
        raise CheckpointError(
            f"checkpoint {path} does not match this run ({len(diffs)} difference(s)); resume with the "
            f"settings it was written with, or start a fresh run (trainer.resume=false, or a new "
            f"hydra.run.dir):\n  " + "\n  ".join(shown) + more
        )


def checkpoint_backbone(checkpoint: Mapping[str, Any], path: "str | Path" = "") -> dict[str, Any]:
    """The backbone settings (``name``, ``in_chans``, ``timm_kwargs`` ...) a checkpoint was written with.

    From the run's saved config when there is one (training checkpoints), else from the
    architecture record (``save_learner`` files: name and input channels).
    """
    saved = dict((checkpoint.get("config") or {}).get("backbone") or {})
    if saved.get("name"):
        return saved
    arch = dict(checkpoint.get("architecture") or {})
    if arch.get("backbone"):
        out: dict[str, Any] = {"name": str(arch["backbone"])}
        if isinstance(arch.get("in_chans"), int):
            out["in_chans"] = int(arch["in_chans"])
        return out
    raise CheckpointError(
        f"checkpoint {path}: records neither the config of its run nor its backbone architecture, so the "
        f"backbone to build is unknown; write it with medmeta.learners.save_learner or a training run"
    )


def restore_learner(
    checkpoint: Mapping[str, Any], learner: nn.Module, backbone: nn.Module, mode: str, where: str = "learner",
    source: str = "checkpoint",
) -> None:
    """Load a checkpoint into ``learner`` (``mode="learner"``: its whole state) or only into
    ``backbone`` (``mode="backbone"``); errors name ``source`` and ``where`` and say what differs."""
    from medmeta.learners.state import check_learner_fits

    state = checkpoint.get("model")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: holds no learner weights ('model')")
    if mode == "learner":
        arch = dict(checkpoint.get("architecture") or {})
        check_learner_fits({**checkpoint, "architecture": {k: v for k, v in arch.items() if k != "learner"}},
                           learner, source)
        try:
            learner.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{source}: its {arch.get('learner', 'learner')} weights do not fit {where}: {err}") from err
        return
    if mode != "backbone":
        raise ValueError(f"restore_learner: mode must be 'learner' or 'backbone', got {mode!r}")
    prefix = checkpoint.get("backbone_prefix")
    if prefix is None:
        raise CheckpointError(f"{source}: it does not record where its backbone weights are")
    try:
        backbone.load_state_dict(backbone_state_dict(state, prefix))
    except RuntimeError as err:
        raise CheckpointError(f"{source}: its backbone does not fit {where}: {err}") from err
