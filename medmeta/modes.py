"""Execution modes: train/eval mode for a block of code, restored exactly afterwards; whether
code runs inside a ``torch.func`` transform; and whether backbones may switch CPU inputs to the
channels-last memory format (:func:`cpu_channels_last`).

``module.train(was_training)`` restores only the top-level flag and overwrites every submodule
with it, which silently un-freezes BatchNorm layers a learner keeps in eval mode. This context
records every submodule's own flag and puts each back, so nesting and partial freezing survive.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["module_mode", "in_functorch_transform", "cpu_channels_last", "cpu_channels_last_enabled"]

_CPU_CHANNELS_LAST: contextvars.ContextVar[bool] = contextvars.ContextVar("medmeta_cpu_channels_last", default=True)


@contextmanager
def cpu_channels_last(enabled: bool) -> Iterator[None]:
    """Allow (``True``, the default outside any block) or forbid backbones that support it
    (:class:`~medmeta.backbones.conv4.Conv4`) to run CPU inputs in channels-last inside the block.

    Channels-last makes Conv-4's forward and backward passes 1.5-3x faster on the CPU, but its
    double-backward kernels slower: second-order MAML with two or more inner steps turns it off
    for its meta-training passes.
    """
    token = _CPU_CHANNELS_LAST.set(enabled)
    try:
        yield
    finally:
        _CPU_CHANNELS_LAST.reset(token)


def cpu_channels_last_enabled() -> bool:
    """Whether :func:`cpu_channels_last` allows channels-last here."""
    return _CPU_CHANNELS_LAST.get()


def in_functorch_transform() -> bool:
    """True inside ``torch.func.vmap`` / ``grad`` / ``jacrev`` ..., where some tensor operations
    (``torch.autograd.grad``, memory-format queries) are not available."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@contextmanager
def module_mode(module: nn.Module, train: Optional[bool] = None) -> Iterator[nn.Module]:
    """Run a block with ``module`` in train (``True``) or eval (``False``) mode, or as it is
    (``None``: the block may switch modes itself); every submodule's flag is restored afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    if train is not None:
        module.train(train)
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag
