"""Save and load a learner's state (backbone, meta-parameters, optimiser) safely.

A checkpoint is a plain dict of tensors and primitives written atomically (temporary file,
then ``os.replace``) and read with ``torch.load(weights_only=True)``, so loading never runs
pickled code. It records the learner class and backbone name; loading into a learner with a
different architecture fails with a message listing what differs.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["save_learner", "load_learner", "learner_architecture", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "medmeta-learner"
CHECKPOINT_VERSION = 1


def learner_architecture(learner: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: learner class, backbone name and feature size."""
    backbone = getattr(learner, "backbone", None)
    return {
        "learner": type(learner).__name__,
        "backbone": str(getattr(backbone, "name", type(backbone).__name__ if backbone is not None else "")),
        "num_features": int(getattr(learner, "num_features", getattr(backbone, "num_features", 0)) or 0),
    }


_PLAIN = (int, float, bool, str, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    """``extra`` must survive ``weights_only`` loading: tensors, numbers, strings, lists, dicts."""
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
        f"save_learner: {where} is a {type(value).__name__}; extra may only hold tensors, numbers, "
        f"strings, None, lists and dicts (what torch.load(weights_only=True) reads back)"
    )


def save_learner(
    path: "str | Path",
    learner: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write the learner's ``state_dict`` (and the optimiser's, and ``extra``) atomically.

    ``extra`` must hold tensors and plain Python values (numbers, strings, lists, dicts), which
    is what ``weights_only`` loading accepts (e.g. epoch, step, best score, RNG state tensors).
    """
    path = Path(path)
    _check_plain(dict(extra or {}), "extra")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": learner_architecture(learner),
        "state_dict": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": dict(extra or {}),
    }
    from medmeta.io import write_bytes_atomic

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_learner(
    path: "str | Path",
    learner: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_learner` into ``learner`` (and ``optimizer``).

    Returns the checkpoint's ``extra`` dict. Raises ``ValueError`` naming the learner class,
    backbone, missing and unexpected keys and shape mismatches when the architecture differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path}: cannot be read with weights_only=True ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path}: not a medmeta learner checkpoint (written by save_learner)")
    saved_arch = ckpt.get("architecture", {})
    own_arch = learner_architecture(learner)
    state = ckpt["state_dict"]
    own = learner.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    arch_diff = {k: (saved_arch.get(k), v) for k, v in own_arch.items() if saved_arch.get(k) != v}
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
        raise ValueError("; ".join(parts))
    learner.load_state_dict(state, strict=strict)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise ValueError(f"checkpoint {path}: has no optimizer state to load")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"checkpoint {path}: optimizer state does not fit the optimizer ({err})") from err
    return dict(ckpt.get("extra") or {})
