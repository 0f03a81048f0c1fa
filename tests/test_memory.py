"""medmeta.memory.track_peak_memory against hand-counted tensor sizes, and the memory property it
lets the MAML family state: a first-order inner loop holds one set of adapted weights and one of
gradients at a time, so its peak does not grow with the number of inner steps."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from medmeta.learners.maml import FOMAML
from medmeta.memory import track_peak_memory

sys.path.insert(0, str(Path(__file__).parent / "learners"))
from learner_fixtures import TinyMLP, random_episode  # noqa: E402

MIB = 2**20


def test_peak_counts_live_tensors_only() -> None:
    with track_peak_memory("cpu") as peak:
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        b = torch.ones(MIB // 2)  # 2 MiB: 3 MiB live
        del a, b
        c = torch.ones(MIB // 4, dtype=torch.float64)  # 2 MiB, after the others were freed
        del c
    assert peak.bytes == 3 * MIB and peak.mib == 3.0


def test_memory_live_before_the_block_is_not_counted() -> None:
    kept = torch.ones(MIB)  # 4 MiB allocated before
    with track_peak_memory("cpu") as peak:
        extra = kept + 1  # 4 MiB more (and a few bytes for the wrapped scalar)
        del extra
    assert 4 * MIB <= peak.bytes < 4 * MIB + 1024


def test_only_cpu_and_cuda_are_measured() -> None:
    with pytest.raises(ValueError, match="cpu or cuda"):
        with track_peak_memory("meta"):
            pass


def _meta_step_peak(learner_cls: type, steps: int) -> int:
    """Peak tensor memory of one meta-backward on a weight-heavy network (1.5 M weights, tiny activations)."""
    torch.manual_seed(0)
    learner = learner_cls(TinyMLP(3 * 16 * 16, hidden=2048), inner_steps=steps, inner_lr=0.1)
    episodes = [random_episode("MULTICLASS_CLASSIFICATION", size=16, seed=i) for i in range(2)]
    learner.meta_backward(episodes)  # allocates .grad once, outside the measured block
    learner.zero_grad(set_to_none=True)
    with track_peak_memory("cpu") as peak:
        learner.meta_backward(episodes)
    return peak.bytes


def test_first_order_inner_loop_memory_does_not_grow_with_steps() -> None:
    weights = (3 * 16 * 16 + 1) * 2048 * 4
    few, many = _meta_step_peak(FOMAML, 3), _meta_step_peak(FOMAML, 7)
    assert few >= 2 * weights  # adapted weights and their gradients are live at once: the count sees them
    assert many <= few + weights // 8, (few / MIB, many / MIB)
