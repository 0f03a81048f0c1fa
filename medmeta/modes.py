"""Train/eval mode for a block of code, restored exactly afterwards.

``module.train(was_training)`` restores only the top-level flag and overwrites every submodule
with it, which silently un-freezes BatchNorm layers a learner keeps in eval mode. This context
records every submodule's own flag and puts each back, so nesting and partial freezing survive.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn

__all__ = ["module_mode"]


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
