"""Metric logging: a tidy CSV always, TensorBoard by default, Weights & Biases on request.

Backends are chosen by name (``logger.backends`` in the config). TensorBoard goes through
``torch.utils.tensorboard``; ``wandb`` is imported only when selected and runs offline by
default (``mode=offline``: nothing leaves the machine; ``wandb sync`` uploads later).

The CSV (``metrics.csv``) is long format, one row per value: ``step,name,value,time``, so
training and validation metrics with different names share one appendable file. When a run
resumes from step ``s``, rows after ``s`` (written after the checkpoint, then lost) are dropped
once, so the file reads like an uninterrupted run.

In distributed runs only rank 0 logs: other ranks get a :class:`MetricLogger` with no backends.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from medmeta.io import write_text_atomic

__all__ = [
    "MetricLogger",
    "CSVBackend",
    "TensorBoardBackend",
    "WandbBackend",
    "BACKENDS",
    "check_backends",
    "read_metrics_csv",
]

BACKENDS = ("csv", "tensorboard", "wandb")


def check_backends(names: Sequence[str]) -> list[str]:
    """Validate backend names (at startup) and check optional packages are importable."""
    out = []
    for name in names:
        key = str(name).strip().lower()
        if key not in BACKENDS:
            raise ValueError(f"logger.backends: unknown backend {name!r}; expected some of {list(BACKENDS)}")
        if key in out:
            continue
        if key == "tensorboard":
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "logger.backends includes 'tensorboard' but the tensorboard package is not installed: "
                    "pip install 'medmeta[logging]', or choose logger=csv"
                ) from err
        if key == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "logger=wandb but the wandb package is not installed: pip install 'medmeta[wandb]', "
                    "or choose logger=default (CSV + TensorBoard) or logger=csv"
                ) from err
        out.append(key)
    return out


def _number(value: Any) -> Optional[float]:
    """``value`` as a float, or None when it is not a number (strings, lists)."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _complete_row(row: list[str], width: int) -> bool:
    """Whether a ``metrics.csv`` row is whole (a run killed mid-write may leave a partial last row)."""
    if len(row) != width:
        return False
    try:
        float(row[0]), float(row[2])
    except ValueError:
        return False
    return True


class CSVBackend:
    """Append-only long-format CSV: ``step,name,value,time``."""

    FIELDS = ("step", "name", "value", "time")

    def __init__(self, path: "str | Path", resume_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._truncate_after(int(resume_step))
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._handle)
        if new:
            self._writer.writerow(self.FIELDS)
            self._handle.flush()

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        # rows up to the resume step; not the test rows of a run killed while testing (logged again)
        kept = [r for r in body if _complete_row(r, len(header)) and int(float(r[0])) <= step and not r[1].startswith("test/")]
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(kept)
        write_text_atomic(self.path, buffer.getvalue())

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = f"{time.time():.3f}"
        buffer = io.StringIO(newline="")  # one write per call: a killed run leaves whole rows
        writer = csv.writer(buffer)
        for name, value in metrics.items():
            writer.writerow([int(step), name, repr(float(value)), now])
        self._handle.write(buffer.getvalue())
        self._handle.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:  # the run folder holds the config
        pass

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


class TensorBoardBackend:
    """``torch.utils.tensorboard.SummaryWriter``; on resume, events after the step are purged."""

    def __init__(self, log_dir: "str | Path", resume_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else int(resume_step) + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), int(step))
        self.writer.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, 0)

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """Weights & Biases, offline by default; the run id is kept in the run folder so a resumed
    run continues the same W&B run."""

    def __init__(
        self,
        run_dir: "str | Path",
        project: str = "medmeta",
        mode: str = "offline",
        entity: Optional[str] = None,
        group: Optional[str] = None,
        name: Optional[str] = None,
        tags: Sequence[str] = (),
        config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode: expected offline, online or disabled, got {mode!r}")
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "logger=wandb but the wandb package is not installed: pip install 'medmeta[wandb]'"
            ) from err
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags),
            mode=mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=dict(config or {}),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Fan metrics out to the selected backends; a no-op on ranks other than 0.

    Args:
        run_dir: the run folder (``metrics.csv`` and ``tensorboard/`` go there).
        backends: names among ``csv``, ``tensorboard``, ``wandb``.
        enabled: False on non-zero ranks.
        resume_step: the step a resumed run continues from (older rows after it are dropped).
        wandb: keyword arguments of :class:`WandbBackend`.
    """

    def __init__(
        self,
        run_dir: "str | Path",
        backends: Sequence[str] = ("csv", "tensorboard"),
        enabled: bool = True,
        resume_step: Optional[int] = None,
        wandb: Optional[Mapping[str, Any]] = None,
        config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.backends: list[Any] = []
        self.enabled = bool(enabled)
        if not self.enabled:
            return
        names = check_backends(backends)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in names:
                if name == "csv":
                    self.backends.append(CSVBackend(self.run_dir / "metrics.csv", resume_step))
                elif name == "tensorboard":
                    self.backends.append(TensorBoardBackend(self.run_dir / "tensorboard", resume_step))
                elif name == "wandb":
                    self.backends.append(WandbBackend(self.run_dir, config=config, **dict(wandb or {})))
        except BaseException:
            self.close()
            raise
        if config is not None:
            for backend in self.backends:
                if not isinstance(backend, WandbBackend):
                    backend.log_config(config)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric ``metrics`` at ``step`` (non-numeric values are ignored)."""
        clean = {k: _number(v) for k, v in metrics.items() if _number(v) is not None}
        if not clean:
            return
        for backend in self.backends:
            backend.log(clean, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics_csv(path: "str | Path"):
    """The long-format metrics CSV as a pandas DataFrame (``step, name, value, time``)."""
    import pandas as pd

    return pd.read_csv(path)
