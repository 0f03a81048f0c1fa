"""Every learner runs unchanged on CUDA: its predictions and (episodic learners) its meta-gradient
equal the same computation on the CPU, and the MAML family's ``vmap`` path equals its loop there.

Comparisons run in float64, so that CPU and GPU differ only by summation order (about 1e-12) even
through the iterative learners (TIM's 1000 Adam steps, PT-MAP's Sinkhorn). A learner whose
predictions depend on the random state (checked on the CPU: two seeds give different logits) is
only required to run on CUDA and give finite logits of the right shape there. Skipped without a GPU
(``tests/conftest.py``); run with ``python -m pytest -m gpu``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from learner_fixtures import TARGETS, random_episode

from medmeta.backbones import create_backbone
from medmeta.learners import create_learner, list_learners
from medmeta.learners.registry import LEARNERS
from medmeta.tasks import Episode

pytestmark = pytest.mark.gpu

NEEDS_TASK_LIST = {"mm_pt"}  # built from the training tasks: tests/training/test_training_cuda.py
PREDICTORS = [n for n in list_learners() if n not in NEEDS_TASK_LIST]
EPISODIC = [n for n in PREDICTORS if getattr(LEARNERS.get(n), "training_kind", None) == "episodic"]
MAML_FAMILY = ["maml", "fomaml", "anil", "metasgd", "protomaml"]


@pytest.fixture(autouse=True)
def _exact_cuda_math():
    """No TF32: CUDA matmuls and convolutions in full precision while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _learner(name: str, device: str, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone("medmeta_conv4_tiny").double()
    return create_learner(name, backbone, **kwargs).to(device)


def _episode(target: str, seed: int = 0) -> Episode:
    return random_episode(target, size=16, dtype=torch.float64, seed=seed)


def _predict(name: str, target: str, device: str, seed: int = 0) -> torch.Tensor:
    learner = _learner(name, device)
    torch.manual_seed(seed)
    return learner.predict(_episode(target).to(device))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", PREDICTORS)
def test_learner_predicts_on_cuda_as_on_cpu(name: str, target: str) -> None:
    cpu = _predict(name, target, "cpu")
    gpu = _predict(name, target, "cuda")
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and torch.isfinite(gpu).all()
    if torch.equal(cpu, _predict(name, target, "cpu", seed=1)):  # deterministic: must agree
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)


def _meta_gradient(name: str, device: str, episodes: list[Episode], seed: int = 0, **kwargs) -> list[torch.Tensor]:
    learner = _learner(name, device, **kwargs)
    torch.manual_seed(seed)
    loss = learner.meta_backward([e.to(device) for e in episodes])
    assert torch.isfinite(loss)
    return [p.grad.cpu() for p in learner.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", EPISODIC)
def test_meta_gradient_on_cuda_equals_cpu(name: str) -> None:
    """Where the meta-loss draws random numbers (FEAT's attention dropout), CPU and CUDA draw
    different ones: such a learner is also compared with its randomness switched off."""
    episodes = [_episode(t, seed=i) for i, t in enumerate(TARGETS)]
    runs = [{}] + ([{"dropout": 0.0}] if name == "feat" else [])
    for kwargs in runs:
        cpu = _meta_gradient(name, "cpu", episodes, **kwargs)
        gpu = _meta_gradient(name, "cuda", episodes, **kwargs)
        assert cpu and len(gpu) == len(cpu), f"{name}: no meta-gradient"
        assert all(torch.isfinite(g).all() for g in gpu)
        deterministic = all(torch.equal(a, b) for a, b in zip(cpu, _meta_gradient(name, "cpu", episodes, seed=1, **kwargs)))
        if deterministic:
            scale = max(float(g.abs().max()) for g in cpu)
            for a, b in zip(cpu, gpu):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7 * scale)
    assert deterministic or name == "feat", f"{name}: meta-gradient depends on the seed"


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", MAML_FAMILY)
def test_vmap_meta_gradient_on_cuda_equals_the_loop(name: str, steps: int) -> None:
    """Tasks of one shape batched with torch.func.vmap give the loop's meta-gradient on CUDA."""
    episodes = [_episode("MULTICLASS_CLASSIFICATION", seed=i).to("cuda") for i in range(3)]
    grads = []
    for vmap in (False, True):
        learner = _learner(name, "cuda", inner_steps=steps, vmap=vmap)
        learner.meta_backward(episodes)
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
