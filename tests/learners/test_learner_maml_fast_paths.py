"""MAML's fast paths give the reference path's numbers.

medmeta's MAML skips work that cannot change the result: with a zero head the first inner step
adapts only the head (the backbone gradient is exactly zero), the BatchNorm refresh happens in
that step's forward pass, train/eval flags are set once per call, and outside ``vmap`` the inner
gradients come from ``torch.autograd.grad`` instead of ``torch.func.grad``. The reference below is
the plain algorithm: a separate no-grad refresh pass, then every inner step through the whole
network with ``torch.func.grad`` and ``functional_call`` (running statistics passed as ``None``).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from learner_fixtures import random_episode
from torch import Tensor
from torch.func import functional_call, grad

from medmeta.backbones import create_backbone
from medmeta.learners import ANIL, FOMAML, MAML, MetaSGD, ProtoMAML
from medmeta.learners.heads import task_loss
from medmeta.learners.maml import inner_loop
from medmeta.learners.protonet import class_prototypes, prototype_head
from medmeta.tasks import Episode

CLASSES = {"MAML": MAML, "FOMAML": FOMAML, "ANIL": ANIL, "Meta-SGD": MetaSGD, "ProtoMAML": ProtoMAML}
LR = 0.3


def _episodes() -> list[Episode]:
    kw: dict[str, Any] = dict(shots=2, queries=3, size=16, dtype=torch.float64)
    return [random_episode("MULTICLASS_CLASSIFICATION", 3, seed=1, **kw), random_episode("BINARY_CLASSIFICATION", 2, seed=2, **kw)]


def _backbone():
    torch.manual_seed(0)
    return create_backbone("medmeta_conv4_tiny").double()


def _reference(learner: MAML, episodes: list[Episode], steps: int) -> tuple[list[Tensor], dict[str, Tensor], float]:
    """Meta-gradients (every learner parameter), running statistics and loss of the plain algorithm."""
    backbone = learner.backbone
    first_order = learner.first_order
    total = 0.0
    for ep in episodes:
        with torch.no_grad():  # the refresh pass
            backbone.train()
            backbone(ep.support_images)
        params: dict[str, Tensor] = dict(backbone.named_parameters())
        buffers = {n: None for n, _ in backbone.named_buffers()}  # transductive: batch statistics only

        def feats(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(backbone, (p, buffers), (x,))  # type: ignore[arg-type]

        desc, target = ep.description, ep.description.task_target
        if learner.head_init == "proto":
            w, b = prototype_head(class_prototypes(feats(params, ep.support_images), ep.support_labels, desc))
        else:
            w = torch.zeros(desc.num_outputs, learner.num_features, dtype=torch.float64)
            b = torch.zeros(desc.num_outputs, dtype=torch.float64)
        head = {"weight": w, "bias": b}
        adapted = {} if learner.head_only else dict(params)
        fixed_feats = feats(params, ep.support_images) if learner.head_only else None

        def loss(a: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
            f = fixed_feats if fixed_feats is not None else feats({**params, **a}, ep.support_images)
            return task_loss(F.linear(f, h["weight"], h["bias"]), ep.support_labels, target)

        def rate(group: int, name: str):
            if not learner.learn_inner_lr:
                return LR
            return learner.inner_lrs[name.replace(".", "/")] if group == 0 else learner.head_inner_lrs[name]

        for _ in range(steps):
            if first_order:
                ga, gh = grad(loss, argnums=(0, 1))({k: v.detach() for k, v in adapted.items()}, {k: v.detach() for k, v in head.items()})
            else:
                ga, gh = grad(loss, argnums=(0, 1))(adapted, head)
            adapted = {n: adapted[n] - rate(0, n) * ga[n] for n in adapted}
            head = {n: head[n] - rate(1, n) * gh[n] for n in head}
        q = F.linear(feats({**params, **adapted}, ep.query_images), head["weight"], head["bias"])
        query_loss = task_loss(q, ep.query_labels, target)
        (query_loss / len(episodes)).backward()
        total += float(query_loss.detach()) / len(episodes)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.parameters()]
    stats = {k: v.clone() for k, v in backbone.named_buffers()}
    return grads, stats, total


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_backward_equals_the_plain_algorithm(name: str, steps: int) -> None:
    episodes = _episodes()
    ours = CLASSES[name](_backbone(), inner_steps=steps, inner_lr=LR)
    reference = CLASSES[name](_backbone(), inner_steps=steps, inner_lr=LR)
    loss = ours.meta_backward(episodes)
    with reference._meta_training_layout():  # the CPU memory layout the learner meta-trains in (bit-equal stats)
        expected_grads, expected_stats, expected_loss = _reference(reference, episodes, steps)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-12)
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ours.parameters()]
    assert max(float(g.abs().max()) for g in got) > 1e-4  # a real gradient
    for g, e in zip(got, expected_grads):
        # float64; atol covers summation order (the reference runs under torch.func, where Conv-4 keeps NCHW)
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    for k, v in ours.backbone.named_buffers():  # the folded refresh is the refresh pass, bit for bit
        assert torch.equal(v, expected_stats[k]), k


def test_zero_head_first_step_runs_no_extra_backbone_pass() -> None:
    """MAML, 1 inner step: one support and one query pass per task (no refresh pass, no step-0 re-run)."""
    calls = []
    learner = MAML(_backbone(), inner_steps=1, inner_lr=LR)
    learner.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    episodes = _episodes()
    learner.meta_backward(episodes)
    assert calls == [n for ep in episodes for n in (ep.n_support, ep.n_query)]


def test_flags_are_restored_after_every_call() -> None:
    learner = MAML(_backbone(), inner_steps=2, eval_inner_steps=2)
    model: Any = learner.backbone.model
    bn = model.blocks[1][1]
    bn.eval()  # a mixed state the caller chose
    untracked = model.blocks[2][1]
    untracked.track_running_stats = False
    before = {n: (m.training, getattr(m, "track_running_stats", None)) for n, m in learner.backbone.named_modules()}
    ep = _episodes()[0]
    learner.meta_backward([ep])
    learner.meta_loss([ep])
    learner.predict(ep)
    learner.features(dict(learner.backbone.named_parameters()), ep.query_images)
    with pytest.raises(Exception):
        learner.meta_backward([Episode(ep.support_images, ep.support_labels, ep.query_images[:, :1], ep.query_labels, ep.description)])
    after = {n: (m.training, getattr(m, "track_running_stats", None)) for n, m in learner.backbone.named_modules()}
    assert after == before
    assert not learner._state_active


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_takes_partial_derivatives_like_torch_func(first_order: bool) -> None:
    """``b`` depends on ``a`` (as a prototype head depends on the backbone): each input is its own variable.

    loss(a, b) = a * b with a = x, b = 2x, x = 1: one step gives a1 = a - lr b, b1 = b - lr a;
    d a1 / dx = 1 - 2 lr and d b1 / dx = 2 - lr (second order), 1 and 2 (first order).
    """
    lr = 0.25
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (a1,), (b1,) = (d.values() for d in inner_loop(lambda p, q: p["a"] * q["b"], ({"a": x}, {"b": 2 * x}), 1, lr, first_order))
    assert float(a1) == pytest.approx(1 - 2 * lr) and float(b1) == pytest.approx(2 - lr)
    da, = torch.autograd.grad(a1, x, retain_graph=True)
    db, = torch.autograd.grad(b1, x)
    assert (float(da), float(db)) == ((1.0, 2.0) if first_order else (pytest.approx(1 - 2 * lr), pytest.approx(2 - lr)))
    # the torch.func path (used under vmap) gives the same numbers
    via_vmap = torch.func.vmap(
        lambda v: inner_loop(lambda p, q: p["a"] * q["b"], ({"a": v}, {"b": 2 * v}), 1, lr, first_order)[0]["a"]
    )(torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(via_vmap, torch.full((2,), 1 - 2 * lr, dtype=torch.float64))


@pytest.mark.parametrize("name", ["MAML", "FOMAML", "Meta-SGD"])
def test_zero_head_second_step_reuses_the_first_forward_pass(name: str) -> None:
    """3 inner steps: the second step runs on the first step's support pass (the backbone has not moved)."""
    calls = []
    learner = CLASSES[name](_backbone(), inner_steps=3, inner_lr=LR)
    learner.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    episodes = _episodes()
    learner.meta_backward(episodes)
    assert calls == [n for ep in episodes for n in (ep.n_support, ep.n_support, ep.n_query)]


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_evaluation_inner_loop_equals_the_plain_loop(steps: int) -> None:
    """Evaluation (no graph, detached parameters) takes the same fast paths and gives the plain loop's numbers."""
    learner = MAML(_backbone(), inner_steps=1, eval_inner_steps=steps, inner_lr=LR)
    ep = _episodes()[0]
    got = learner.adapt_parameters(ep.support_images, ep.support_labels, ep.description)
    assert all(not t.requires_grad for d in (got.params, got.head) for t in d.values())
    backbone = learner.backbone
    backbone.train()
    buffers = {n: None for n, _ in backbone.named_buffers()}
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    head = {"weight": torch.zeros(3, learner.num_features, dtype=torch.float64), "bias": torch.zeros(3, dtype=torch.float64)}

    def loss(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        f = functional_call(backbone, (p, buffers), (ep.support_images,))  # type: ignore[arg-type]
        return task_loss(F.linear(f, h["weight"], h["bias"]), ep.support_labels, ep.description.task_target)

    for _ in range(steps):
        ga, gh = grad(loss, argnums=(0, 1))(params, head)
        params = {n: params[n] - LR * ga[n] for n in params}
        head = {n: head[n] - LR * gh[n] for n in head}
    for n in params:
        torch.testing.assert_close(got.params[n], params[n], rtol=1e-10, atol=1e-12)
    for n in head:
        torch.testing.assert_close(got.head[n], head[n], rtol=1e-10, atol=1e-12)
