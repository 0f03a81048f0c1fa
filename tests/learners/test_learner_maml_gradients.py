"""MAML family, checked to the gradient against independent computations.

The reference below writes a two-layer tanh network and its losses by hand on one flat
parameter vector, unrolls the inner SGD loop explicitly and forms the meta-gradient from full
Hessians: ``(I - a H_0)(I - a H_1)...(I - a H_{K-1}) grad L_q(phi_K)`` (second order) or
``grad L_q(phi_K)`` (first order). Finite differences of ``meta_loss`` check the same numbers a
third way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from learner_fixtures import TinyMLP, random_episode
from torch import Tensor

from medmeta.learners import ANIL, FOMAML, MAML, MetaSGD, ProtoMAML, ProtoNet
from medmeta.tasks import Episode

torch.set_default_dtype(torch.float32)
D_IN, HIDDEN = 4, 3
LR, STEPS = 0.5, 3


def _episodes() -> list[Episode]:
    """A 3-way multi-class episode and a binary episode (variable way in one meta-batch)."""
    a = random_episode("MULTICLASS_CLASSIFICATION", 3, shots=2, queries=2, size=2, channels=1, seed=1, dtype=torch.float64)
    b = random_episode("BINARY_CLASSIFICATION", 2, shots=3, queries=2, size=2, channels=1, seed=2, dtype=torch.float64)
    return [a, b]


def _learner(cls=MAML, **kwargs) -> MAML:
    torch.manual_seed(0)
    backbone = TinyMLP(D_IN, HIDDEN).double()
    kwargs.setdefault("inner_steps", STEPS)
    kwargs.setdefault("inner_lr", LR)
    return cls(backbone, **kwargs)


# -- the independent reference ---------------------------------------------------------------
def _split(phi: Tensor, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    i = 0
    a = phi[i : i + HIDDEN * D_IN].view(HIDDEN, D_IN)
    i += HIDDEN * D_IN
    b = phi[i : i + HIDDEN]
    i += HIDDEN
    w = phi[i : i + n_out * HIDDEN].view(n_out, HIDDEN)
    i += n_out * HIDDEN
    return a, b, w, phi[i : i + n_out]


def _loss(phi: Tensor, x: Tensor, y: Tensor, sigmoid: bool, n_out: int) -> Tensor:
    a, b, w, c = _split(phi, n_out)
    z = torch.tanh(x.flatten(1) @ a.T + b) @ w.T + c
    if sigmoid:  # binary cross-entropy with logits, written out: log(1 + e^z) - y z
        return (torch.logaddexp(torch.zeros_like(z), z) - y * z).mean()
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


def _reference_meta_grad(theta: Tensor, ep: Episode, second_order: bool, head_only: bool = False) -> Tensor:
    sigmoid = ep.description.task_target.uses_sigmoid
    n_out = ep.description.num_outputs
    n_theta = theta.numel()
    phi = torch.cat([theta, torch.zeros(n_out * HIDDEN + n_out, dtype=theta.dtype)])
    mask = torch.ones_like(phi)
    if head_only:
        mask[:n_theta] = 0.0

    def ls(p: Tensor) -> Tensor:
        return _loss(p, ep.support_images, ep.support_labels, sigmoid, n_out)

    phis = [phi]
    for _ in range(STEPS):
        p = phis[-1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(ls(p), p)
        phis.append(phis[-1] - LR * mask * g)
    p = phis[-1].detach().requires_grad_(True)
    (v,) = torch.autograd.grad(_loss(p, ep.query_images, ep.query_labels, sigmoid, n_out), p)
    if second_order:
        for i in reversed(range(STEPS)):
            hess = torch.autograd.functional.hessian(ls, phis[i].detach())
            v = v - LR * (mask[:, None] * hess).T @ v
    return v[:n_theta]


def _theta(learner: MAML) -> Tensor:
    return torch.cat([learner.backbone.fc.weight.detach().flatten(), learner.backbone.fc.bias.detach()])


def _learner_grad(learner: MAML, episodes: list[Episode]) -> Tensor:
    learner.zero_grad()
    learner.meta_loss(episodes).backward()
    return torch.cat([learner.backbone.fc.weight.grad.flatten(), learner.backbone.fc.bias.grad])


def _finite_difference(learner: MAML, episodes: list[Episode], params: list[Tensor], eps: float = 1e-6) -> Tensor:
    out = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = float(flat[j])
                flat[j] = old + eps
                up = float(learner.meta_loss(episodes))
                flat[j] = old - eps
                down = float(learner.meta_loss(episodes))
                flat[j] = old
                out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


# -- tests ----------------------------------------------------------------------------------------
def test_second_order_meta_gradient_equals_hessian_formula_and_finite_differences() -> None:
    learner = _learner(MAML)
    episodes = _episodes()
    got = _learner_grad(learner, episodes)
    theta = _theta(learner)
    expected = torch.stack([_reference_meta_grad(theta, ep, second_order=True) for ep in episodes]).mean(0)
    assert got.abs().max() > 1e-3  # a real, non-trivial gradient
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    fd = _finite_difference(learner, episodes, [learner.backbone.fc.weight, learner.backbone.fc.bias])
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-8)
    # the first-order formula gives a different answer here: second-order terms matter
    first = torch.stack([_reference_meta_grad(theta, ep, second_order=False) for ep in episodes]).mean(0)
    assert (got - first).abs().max() > 1e-4


def test_first_order_meta_gradient_equals_first_order_formula() -> None:
    learner = _learner(FOMAML)
    episodes = _episodes()
    got = _learner_grad(learner, episodes)
    expected = torch.stack([_reference_meta_grad(_theta(learner), ep, second_order=False) for ep in episodes]).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # same forward pass as second-order MAML: equal losses
    second = _learner(MAML)
    assert second.meta_loss(episodes).item() == pytest.approx(learner.meta_loss(episodes).item(), rel=1e-12)


def test_anil_adapts_only_the_head_and_its_meta_gradient_is_exact() -> None:
    learner = _learner(ANIL)
    ep = _episodes()[0]
    before = {k: v.detach().clone() for k, v in learner.backbone.named_parameters()}
    adapted = learner.adapt_parameters(ep.support_images, ep.support_labels, ep.description, training=True)
    for name, value in adapted.params.items():
        assert torch.equal(value, before[name]), name
    assert adapted.head["weight"].abs().max() > 0  # the zero head moved
    full = _learner(MAML).adapt_parameters(ep.support_images, ep.support_labels, ep.description, training=True)
    assert not torch.equal(full.params["fc.weight"], before["fc.weight"])  # MAML moves the backbone
    episodes = _episodes()
    got = _learner_grad(learner, episodes)
    theta = _theta(learner)
    expected = torch.stack([_reference_meta_grad(theta, e, second_order=True, head_only=True) for e in episodes]).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    fd = _finite_difference(learner, episodes, [learner.backbone.fc.weight, learner.backbone.fc.bias])
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-8)


def test_meta_sgd_learned_rates_get_exact_gradients_and_start_as_maml() -> None:
    learner = _learner(MetaSGD)
    episodes = _episodes()
    assert learner.meta_loss(episodes).item() == pytest.approx(_learner(MAML).meta_loss(episodes).item(), rel=1e-12)
    learner.zero_grad()
    learner.meta_loss(episodes).backward()
    lr_params = [learner.inner_lrs["fc/weight"], learner.inner_lrs["fc/bias"], learner.head_inner_lrs["weight"], learner.head_inner_lrs["bias"]]
    got = torch.cat([p.grad.flatten() for p in lr_params])
    fd = _finite_difference(learner, episodes, lr_params)
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="eval_inner_lr"):
        MetaSGD(TinyMLP(D_IN), eval_inner_lr=0.01)
    with pytest.raises(ValueError, match="fixes learn_inner_lr"):
        MetaSGD(TinyMLP(D_IN), learn_inner_lr=False)


def test_proto_maml_head_starts_as_protonet_and_gradient_matches_finite_differences() -> None:
    learner = _learner(ProtoMAML, eval_inner_steps=0)
    proto = ProtoNet(learner.backbone, distance="euclidean", temperature=1.0)
    for target in ("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION", "ORDINAL_REGRESSION"):
        ep = random_episode(target, 3, shots=2, queries=3, size=2, channels=1, seed=5, dtype=torch.float64)
        got = learner.predict(ep)
        expected = proto.predict(ep)
        if ep.description.task_target.uses_sigmoid:  # exactly the two-prototype logits
            torch.testing.assert_close(got, expected)
        else:  # equal up to a per-row constant: the same softmax
            torch.testing.assert_close(got.softmax(1), expected.softmax(1))
    trained = _learner(ProtoMAML)
    episodes = _episodes()
    got = _learner_grad(trained, episodes)
    fd = _finite_difference(trained, episodes, [trained.backbone.fc.weight, trained.backbone.fc.bias])
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_over_tasks_equals_the_loop(first_order: bool) -> None:
    from medmeta.backbones import create_backbone

    kw = dict(shots=2, queries=2, size=16, dtype=torch.float64)
    episodes = [random_episode("MULTICLASS_CLASSIFICATION", 3, seed=s, **kw) for s in (1, 2)]
    episodes += [random_episode("BINARY_CLASSIFICATION", 2, seed=3, **kw)]
    grads, losses, preds = [], [], []
    for use_vmap in (False, True):
        torch.manual_seed(0)
        backbone = create_backbone("medmeta_conv4_tiny").double()
        learner = MAML(backbone, inner_steps=2, eval_inner_steps=3, first_order=first_order, vmap=use_vmap)
        loss = learner.meta_loss(episodes)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters()]))
        preds.append(torch.cat([p.flatten() for p in learner.predict_batch(episodes)]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-8, atol=1e-10)


def test_batchnorm_modes_are_explicit_and_evaluation_leaves_state_unchanged() -> None:
    from medmeta.backbones import create_backbone

    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, shots=2, queries=3, size=16, seed=4)
    for mode in ("transductive", "running"):
        torch.manual_seed(0)
        learner = MAML(create_backbone("medmeta_conv4_tiny"), eval_inner_steps=2, bn_mode=mode)
        state = {k: v.clone() for k, v in learner.state_dict().items()}
        predictor = learner.adapt(ep.support_images, ep.support_labels, ep.description)
        n = ep.n_query
        alone = predictor(ep.query_images)
        together = predictor(torch.cat([ep.query_images, 3.0 + ep.query_images]))[:n]
        if mode == "running":  # each query normalised with running statistics: batch-independent
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
        else:  # transductive: query statistics come from the query batch
            assert (together - alone).abs().max() > 1e-3
        for k, v in learner.state_dict().items():
            assert torch.equal(v, state[k]), f"{mode}: adapt changed {k}"
        # meta-training refreshes running statistics from support sets (and only then)
        learner.meta_loss([ep])
        bn = learner.backbone.model.blocks[0][1]
        assert not torch.equal(bn.running_mean, state["backbone.model.blocks.0.1.running_mean"])
    frozen = MAML(create_backbone("medmeta_conv4_tiny"), update_running_stats=False)
    before = frozen.backbone.model.blocks[0][1].running_mean.clone()
    frozen.meta_loss([ep])
    assert torch.equal(frozen.backbone.model.blocks[0][1].running_mean, before)


def test_every_task_kind_in_one_meta_batch_and_separate_eval_settings() -> None:
    from medmeta.backbones import create_backbone

    episodes = [
        random_episode("MULTICLASS_CLASSIFICATION", 4, size=16, seed=1),
        random_episode("BINARY_CLASSIFICATION", 2, size=16, seed=2),
        random_episode("MULTILABEL_CLASSIFICATION", 3, size=16, seed=3),
        random_episode("ORDINAL_REGRESSION", 5, size=16, seed=4),
    ]
    torch.manual_seed(0)
    learner = MAML(create_backbone("medmeta_conv4_tiny"), inner_steps=1, eval_inner_steps=5, eval_inner_lr=0.05)
    loss = learner.meta_loss(episodes)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in learner.parameters())
    for ep in episodes:
        assert learner.predict(ep).shape == (ep.n_query, ep.description.num_outputs)
    # evaluation uses eval_inner_steps and eval_inner_lr: equal to a hand-unrolled SGD on the head
    # for ANIL (features fixed), where every step is a plain gradient step on a convex problem
    anil = ANIL(create_backbone("medmeta_conv4_tiny"), inner_steps=1, eval_inner_steps=5, eval_inner_lr=0.05).eval()
    ep = episodes[0]
    adapted = anil.adapt_parameters(ep.support_images, ep.support_labels, ep.description)
    feats = anil.features(dict(anil.backbone.named_parameters()), ep.support_images).detach()
    w = torch.zeros(4, anil.num_features, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    for _ in range(5):
        gw, gb = torch.autograd.grad(F.cross_entropy(feats @ w.T + b, ep.support_labels), (w, b))
        w, b = (w - 0.05 * gw).detach().requires_grad_(), (b - 0.05 * gb).detach().requires_grad_()
    torch.testing.assert_close(adapted.head["weight"], w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapted.head["bias"], b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, MetaSGD, ProtoMAML])
def test_task_by_task_meta_backward_gives_the_meta_loss_gradient(cls) -> None:
    episodes = _episodes()
    grads, losses = [], []
    for per_task in (False, True):
        learner = _learner(cls)
        if per_task:
            loss = learner.meta_backward(episodes)
        else:
            loss = learner.meta_loss(episodes)
            loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    learner = _learner(cls)
    learner.meta_backward(episodes, scale=2.0 / len(episodes))  # a data-parallel share: twice the gradient
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None]), 2 * grads[0])
