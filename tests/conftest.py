"""Shared test settings: headless plots, one thread per worker, GPU tests skipped with a reason."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the apps set their own thread count (medmeta.threads): one per xdist worker, or two workers
# oversubscribe the two cores and OpenMP spin-waits make every later test 10-30x slower
os.environ.setdefault("MEDMETA_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; run on a GPU machine (see README, GPU checks)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
