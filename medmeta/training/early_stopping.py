"""Early stopping on a validation metric, as the MedIMeta baselines use it.

mm-MAML stops when the meta-validation AUROC has not improved for 5 validation rounds, mm-PT
after 10. The state (best value, its step, rounds without improvement) goes into every
checkpoint so that a resumed run stops exactly when the uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Track the best value of a metric and count validation rounds without improvement.

    Args:
        patience: rounds without improvement before stopping; ``None`` never stops.
        mode: ``"max"`` (AUROC, accuracy) or ``"min"`` (loss).
        min_delta: an improvement must exceed this margin.
    """

    def __init__(self, patience: Optional[int] = None, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"trainer.monitor_mode: expected 'max' or 'min', got {mode!r}")
        if patience is not None and int(patience) < 1:
            raise ValueError(f"trainer.patience: expected a positive number of validation rounds or null, got {patience}")
        if float(min_delta) < 0:
            raise ValueError(f"trainer.min_delta: expected >= 0, got {min_delta}")
        self.patience = None if patience is None else int(patience)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: Optional[float] = None
        self.best_step: int = -1
        self.bad_rounds: int = 0

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        if value is None or math.isnan(float(value)):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return float(value) > self.best + self.min_delta
        return float(value) < self.best - self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record a validation result; return True when it is a new best."""
        if self.improves(value):
            self.best, self.best_step, self.bad_rounds = float(value), int(step), 0
            return True
        self.bad_rounds += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_rounds >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_rounds": self.bad_rounds,
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = int(state.get("best_step", -1))
        self.bad_rounds = int(state.get("bad_rounds", 0))
