"""Metric and first-order learners (MatchingNet, RelationNet, FEAT, Baseline++, R2D2, Reptile)
against hand computation, a numpy ridge solution, easyfsl on the same features, and the
properties every inductive learner must have (support-order and query-order invariance)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learner_fixtures import TARGETS, Flatten, TinyMLP, description, labels_for, random_episode

from medmeta.learners import (
    FEAT,
    R2D2,
    BaselinePP,
    CosineHead,
    MatchingNet,
    MultiTaskPretrainer,
    RelationNet,
    Reptile,
    create_learner,
)
from medmeta.learners.heads import task_loss
from medmeta.tasks import Episode

D = 3
SUPPORT = [[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 4.0, 0.0], [1.0, 1.0, 1.0], [3.0, -1.0, 2.0]]
QUERY = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]
LABELS = [0, 0, 1, 2, 2]


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(c) / len(rows) for c in zip(*rows)]


def _flat(dim: int = D) -> Flatten:
    return Flatten(dim).double()


# -- MatchingNet: attention-weighted label sum ---------------------------------------------------
def test_matchingnet_is_the_attention_weighted_label_sum_on_a_2d_toy() -> None:
    support = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    labels = [0, 1, 1]
    query = [[2.0, 1.0], [-1.0, 0.5]]
    expected = []
    for q in query:
        sims = [_dot(q, s) / _norm(s) for s in support]  # the query is not normalised (original code)
        z = sum(math.exp(s) for s in sims)
        a = [math.exp(s) / z for s in sims]
        expected.append([math.log(a[0] + 1e-6), math.log(a[1] + a[2] + 1e-6)])
    learner = MatchingNet(_flat(2)).double()
    got = learner.adapt_features(_t(support), torch.tensor(labels), description("MULTICLASS_CLASSIFICATION", 2))(_t(query))
    torch.testing.assert_close(got, _t(expected))
    # normalize_query + temperature: the paper's cosine attention, sharpened
    cos_learner = MatchingNet(_flat(2), normalize_query=True, temperature=0.5).double()
    got = cos_learner.adapt_features(_t(support), torch.tensor(labels), description("MULTICLASS_CLASSIFICATION", 2))(_t(query))
    q = query[0]
    sims = [_dot(q, s) / (_norm(s) * _norm(q)) / 0.5 for s in support]
    a = [math.exp(s) / sum(math.exp(t) for t in sims) for s in sims]
    assert float(got[0, 0]) == pytest.approx(math.log(a[0] + 1e-6))


def test_matchingnet_sigmoid_tasks_use_the_log_odds_of_the_attention_mass() -> None:
    y = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    expected = []
    for q in QUERY:
        sims = [_dot(q, s) / _norm(s) for s in SUPPORT]
        a = [math.exp(s) / sum(math.exp(t) for t in sims) for s in sims]
        row = []
        for k in range(2):
            pos = sum(a[i] for i in range(5) if y[i][k] == 1)
            neg = sum(a[i] for i in range(5) if y[i][k] == 0)
            row.append(math.log(pos + 1e-6) - math.log(neg + 1e-6))
        expected.append(row)
    learner = MatchingNet(_flat()).double()
    got = learner.adapt_features(_t(SUPPORT), torch.tensor(y), description("MULTILABEL_CLASSIFICATION", 2))(_t(QUERY))
    torch.testing.assert_close(got, _t(expected))
    binary = learner.adapt_features(_t(SUPPORT), torch.tensor(y)[:, :1], description("BINARY_CLASSIFICATION", 2))(_t(QUERY))
    torch.testing.assert_close(binary, _t(expected)[:, :1])


# -- R2D2: closed form against numpy's ridge solution ------------------------------------------------
@pytest.mark.parametrize("n_support,dim", [(6, 10), (12, 4)])  # dual (N <= D) and primal (N > D) solves
@pytest.mark.parametrize("target", TARGETS)
def test_r2d2_equals_the_numpy_ridge_solution(target: str, n_support: int, dim: int) -> None:
    g = torch.Generator().manual_seed(n_support)
    d = description(target, 3)
    per_class = n_support // (1 if target == "BINARY_CLASSIFICATION" else 2) // d.num_classes or 1
    labels = labels_for(target, d.num_classes, max(per_class, 1), g)
    x = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    xq = torch.randn(4, dim, generator=g, dtype=torch.float64)
    lam, scale = 3.0, 2.5
    learner = R2D2(_flat(dim), lam=lam, scale=scale).double()
    got = learner.adapt_features(x, labels, d)(xq)
    X, Xq = x.numpy(), xq.numpy()
    if d.task_target.uses_sigmoid:
        Y = 2.0 * labels.numpy().reshape(len(labels), -1) - 1.0
    else:
        Y = np.eye(d.num_classes)[labels.numpy()]
    W = np.linalg.solve(X.T @ X + lam * np.eye(dim), X.T @ Y)
    np.testing.assert_allclose(got.numpy(), scale * Xq @ W, rtol=1e-9, atol=1e-9)


def test_r2d2_trains_scale_lambda_and_backbone_through_the_solve() -> None:
    torch.manual_seed(0)
    learner = R2D2(TinyMLP(3 * 8 * 8, hidden=4), learn_lambda=True)
    eps = [random_episode(t, 3, seed=i) for i, t in enumerate(TARGETS)]
    learner.meta_backward(eps)
    assert learner.scale.grad is not None and float(learner.scale.grad) != 0.0
    assert learner.log_lambda.grad is not None and float(learner.log_lambda.grad) != 0.0
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in learner.backbone.parameters())
    assert learner.lam.item() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="R2D2: lam"):
        R2D2(TinyMLP(4), lam=0.0)


# -- Baseline++: cosine logits ------------------------------------------------------------------------
def test_baseline_pp_without_steps_is_the_scaled_cosine_to_the_prototypes() -> None:
    protos = [_mean([SUPPORT[i] for i in range(5) if LABELS[i] == c]) for c in range(3)]
    expected = [[4.0 * _dot(q, p) / (_norm(q) * _norm(p)) for p in protos] for q in QUERY]
    learner = BaselinePP(_flat(), scale=4.0, steps=0).double()
    for target in ("MULTICLASS_CLASSIFICATION", "ORDINAL_REGRESSION"):
        got = learner.adapt_features(_t(SUPPORT), torch.tensor(LABELS), description(target, 3))(_t(QUERY))
        torch.testing.assert_close(got, _t(expected))
    y = [1, 0, 0, 1, 1]
    pos = _mean([SUPPORT[i] for i in range(5) if y[i] == 1])
    neg = _mean([SUPPORT[i] for i in range(5) if y[i] == 0])
    expected_bin = [[4.0 * (_dot(q, pos) / (_norm(q) * _norm(pos)) - _dot(q, neg) / (_norm(q) * _norm(neg)))] for q in QUERY]
    got = learner.adapt_features(
        _t(SUPPORT), torch.tensor(y, dtype=torch.float32)[:, None], description("BINARY_CLASSIFICATION", 2)
    )(_t(QUERY))
    torch.testing.assert_close(got, _t(expected_bin))


@pytest.mark.parametrize("target", TARGETS)
def test_baseline_pp_fit_lowers_the_support_loss_and_leaves_the_backbone_alone(target: str) -> None:
    ep = random_episode(target, 3, shots=3, seed=2, dtype=torch.float64)
    learner = BaselinePP(_flat(3 * 8 * 8), steps=50).double()
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    feats = learner.embed(ep.support_images)
    start = BaselinePP(_flat(3 * 8 * 8), steps=0).double().adapt_features(feats, ep.support_labels, ep.description)(feats)
    fitted = learner.adapt_features(feats, ep.support_labels, ep.description)(feats)
    t = ep.description.task_target
    assert float(task_loss(fitted, ep.support_labels, t)) < float(task_loss(start, ep.support_labels, t))
    assert fitted.shape == (len(ep.support_labels), ep.description.num_outputs)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert learner.training_kind is None  # a test-time learner; pre-training uses mm_pt with head=cosine


def test_cosine_head_is_the_pretraining_head_of_mm_pt() -> None:
    tasks = [description("MULTICLASS_CLASSIFICATION", 3, "a: t"), description("MULTILABEL_CLASSIFICATION", 2, "b: t")]
    model = MultiTaskPretrainer(TinyMLP(12, hidden=4), tasks, head="cosine")
    assert all(isinstance(h, CosineHead) for h in model.heads)
    assert model.heads[0].weight.shape == (3, 4) and model.heads[1].weight.shape == (4, 4)  # pos + neg per label
    x = torch.randn(5, 4)
    h = model.heads[1]
    cos = F.normalize(x, dim=1) @ F.normalize(h.weight, dim=1).T
    torch.testing.assert_close(h(x), h.scale * (cos[:, :2] - cos[:, 2:]))
    assert isinstance(MultiTaskPretrainer(TinyMLP(12), tasks).heads[0], torch.nn.Linear)  # default unchanged
    with pytest.raises(ValueError, match="head must be one of"):
        MultiTaskPretrainer(TinyMLP(12), tasks, head="arcface")


# -- RelationNet: the relation module on [prototype, query] pairs ---------------------------------------
def test_relationnet_logits_are_relation_scores_of_prototype_query_pairs() -> None:
    torch.manual_seed(0)
    learner = RelationNet(_flat(), hidden=5).double()
    mlp = learner.relation

    def score(p: list[float], q: list[float]) -> float:
        with torch.no_grad():
            return float(mlp(_t([p + q]))[0, 0])

    protos = [_mean([SUPPORT[i] for i in range(5) if LABELS[i] == c]) for c in range(3)]
    expected = [[score(p, q) for p in protos] for q in QUERY]
    got = learner.adapt_features(_t(SUPPORT), torch.tensor(LABELS), description("MULTICLASS_CLASSIFICATION", 3))(_t(QUERY))
    torch.testing.assert_close(got, _t(expected))
    y = [1, 0, 0, 1, 1]
    pos = _mean([SUPPORT[i] for i in range(5) if y[i] == 1])
    neg = _mean([SUPPORT[i] for i in range(5) if y[i] == 0])
    got = learner.adapt_features(
        _t(SUPPORT), torch.tensor(y, dtype=torch.float32)[:, None], description("BINARY_CLASSIFICATION", 2)
    )(_t(QUERY))
    torch.testing.assert_close(got, _t([[score(pos, q) - score(neg, q)] for q in QUERY]))
    # Sung et al.'s loss: MSE between sigmoid relation scores and one-hot targets
    ep = Episode(
        _t(SUPPORT)[:, None, None, :], torch.tensor(LABELS), _t(QUERY)[:, None, None, :], torch.tensor([2, 1]),
        description("MULTICLASS_CLASSIFICATION", 3),
    )
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    expected_mse = ((torch.sigmoid(_t(expected)) - target) ** 2).mean()
    torch.testing.assert_close(learner.meta_loss([ep]), expected_mse)


# -- FEAT: adapted prototypes -------------------------------------------------------------------------
def test_feat_adapts_prototypes_jointly_and_is_equivariant_to_class_order() -> None:
    torch.manual_seed(0)
    learner = FEAT(_flat(), temperature=2.0).double().eval()
    d = description("MULTICLASS_CLASSIFICATION", 3)
    protos = learner.adapted_prototypes(_t(SUPPORT), torch.tensor(LABELS), d).positive
    raw = torch.stack([_t([_mean([SUPPORT[i] for i in range(5) if LABELS[i] == c])])[0] for c in range(3)])
    torch.testing.assert_close(protos, learner.attention(raw))
    got = learner.adapt_features(_t(SUPPORT), torch.tensor(LABELS), d)(_t(QUERY))
    torch.testing.assert_close(got, -torch.cdist(_t(QUERY), protos) ** 2 / 2.0)
    # relabelling the classes permutes the logit columns the same way
    perm = [2, 0, 1]  # class c becomes perm[c]
    relabelled = torch.tensor([perm[c] for c in LABELS])
    got_perm = learner.adapt_features(_t(SUPPORT), relabelled, d)(_t(QUERY))
    torch.testing.assert_close(got_perm[:, perm], got)



# -- FEAT: the contrastive regulariser --------------------------------------------------------------
def _attention_by_hand(att: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FEAT's one-head set-to-set layer written out (eval mode): LayerNorm(x + fc(softmax(q k^T / sqrt d) v))."""
    q, k, v = x @ att.w_qs.weight.T, x @ att.w_ks.weight.T, x @ att.w_vs.weight.T
    a = torch.softmax(q @ k.T / math.sqrt(x.shape[1]), dim=1)
    y = x + (a @ v) @ att.fc.weight.T + att.fc.bias
    mu, var = y.mean(dim=1, keepdim=True), y.var(dim=1, unbiased=False, keepdim=True)
    return (y - mu) / torch.sqrt(var + att.layer_norm.eps) * att.layer_norm.weight + att.layer_norm.bias


def _feat_episode(target: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, object]:
    g = torch.Generator().manual_seed(seed)
    d = description(target, 3)
    sy, qy = labels_for(target, d.num_classes, 2, g), labels_for(target, d.num_classes, 3, g)
    sf = torch.randn(len(sy), D, generator=g, dtype=torch.float64)
    qf = torch.randn(len(qy), D, generator=g, dtype=torch.float64)
    return sf, sy, qf, qy, d


def test_feat_regularizer_on_a_multiclass_episode_by_hand() -> None:
    """Each class's support + query set is adapted on its own; its mean is the centre; every
    example's own (unadapted) feature is classified against the centres: -|x - c|^2 / temperature2."""
    torch.manual_seed(0)
    learner = FEAT(_flat(), temperature=2.0, balance=0.5, temperature2=3.0).double().eval()
    with torch.no_grad():
        learner.attention.layer_norm.weight.uniform_(0.5, 1.5)
        learner.attention.layer_norm.bias.uniform_(-0.2, 0.2)
    sf, sy, qf, qy, d = _feat_episode("MULTICLASS_CLASSIFICATION")
    x, y = torch.cat([sf, qf]), torch.cat([sy, qy])
    with torch.no_grad():
        centres = torch.stack([_attention_by_hand(learner.attention, x[y == c]).mean(dim=0) for c in range(3)])
        logits = -((x[:, None, :] - centres[None]) ** 2).sum(dim=2) / 3.0
        reg = -torch.log_softmax(logits, dim=1)[torch.arange(len(y)), y].mean()
        protos = torch.stack([_attention_by_hand(learner.attention, torch.stack(
            [sf[sy == c].mean(dim=0) for c in range(3)]))[c] for c in range(3)])
        query_loss = F.cross_entropy(-torch.cdist(qf, protos) ** 2 / 2.0, qy)
        torch.testing.assert_close(learner.regularizer_logits(x, y, d), logits)
        torch.testing.assert_close(learner.regularizer_loss(sf, sy, qf, qy, d), reg)
        torch.testing.assert_close(learner.episode_loss(sf, sy, qf, qy, d), query_loss + 0.5 * reg)


@pytest.mark.parametrize("target", ["BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION"])
def test_feat_regularizer_on_sigmoid_tasks_uses_a_positive_and_a_negative_set_per_label(target: str) -> None:
    torch.manual_seed(1)
    learner = FEAT(_flat(), distance="cosine", temperature2=0.5).double().eval()
    sf, sy, qf, qy, d = _feat_episode(target, seed=2)
    x, y = torch.cat([sf, qf]), torch.cat([sy, qy])

    def centre(rows: torch.Tensor) -> torch.Tensor:
        return _attention_by_hand(learner.attention, rows).mean(dim=0)

    def cos_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(a, b[None], dim=1)

    with torch.no_grad():
        columns = []
        for k in range(y.shape[1]):
            pos, neg = centre(x[y[:, k] == 1]), centre(x[y[:, k] == 0])
            columns.append((-cos_dist(x, pos) + cos_dist(x, neg)) / 0.5)
        logits = torch.stack(columns, dim=1)
        torch.testing.assert_close(learner.regularizer_logits(x, y, d), logits)
        torch.testing.assert_close(
            learner.regularizer_loss(sf, sy, qf, qy, d), F.binary_cross_entropy_with_logits(logits, y.double())
        )


@pytest.mark.parametrize("target", TARGETS)
def test_feat_balance_zero_is_the_query_loss_exactly_and_the_default_adds_the_regularizer(target: str) -> None:
    torch.manual_seed(3)
    off = FEAT(_flat(), balance=0.0).double().eval()
    on = FEAT(_flat()).double().eval()
    on.load_state_dict(off.state_dict())
    assert (on.balance, on.temperature2) == (0.1, 32.0)
    sf, sy, qf, qy, d = _feat_episode(target, seed=4)
    with torch.no_grad():
        query_loss = task_loss(off.episode_head(sf, sy, d)(qf), qy, d.task_target)
        assert torch.equal(off.episode_loss(sf, sy, qf, qy, d), query_loss)
        reg = on.regularizer_loss(sf, sy, qf, qy, d)
        assert torch.isfinite(reg) and reg > 0
        torch.testing.assert_close(on.episode_loss(sf, sy, qf, qy, d), query_loss + 0.1 * reg)
        # the regulariser is a training term only: test-time predictions are the same
        torch.testing.assert_close(on.adapt_features(sf, sy, d)(qf), off.adapt_features(sf, sy, d)(qf))
        # ... and it does not depend on the order of the examples
        perm_s, perm_q = torch.randperm(len(sy)), torch.randperm(len(qy))
        torch.testing.assert_close(on.regularizer_loss(sf[perm_s], sy[perm_s], qf[perm_q], qy[perm_q], d), reg)


def test_feat_regularizer_trains_the_attention_and_the_backbone() -> None:
    torch.manual_seed(0)
    learner = FEAT(TinyMLP(3 * 8 * 8, hidden=4), balance=1.0).double()
    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, seed=1, dtype=torch.float64)
    sf, qf = learner._features(ep)
    reg = learner.regularizer_loss(sf, ep.support_labels, qf, ep.query_labels, ep.description)
    reg.backward()
    for module in (learner.attention, learner.backbone):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("kwargs, match", [({"balance": -0.1}, "balance"), ({"temperature2": 0.0}, "temperature2")])
def test_feat_rejects_bad_regularizer_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"FEAT: {match}"):
        FEAT(_flat(), **kwargs)

# -- properties of every inductive learner --------------------------------------------------------------
def _learners() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dim = 3 * 8 * 8
    return {
        "matchingnet": MatchingNet(_flat(dim)).double(),
        "matchingnet_fce": MatchingNet(_flat(dim), fce=True).double(),
        "relationnet": RelationNet(_flat(dim)).double(),
        "feat": FEAT(_flat(dim)).double(),
        "baseline_pp": BaselinePP(_flat(dim), steps=20).double(),
        "r2d2": R2D2(_flat(dim)).double(),
        "reptile": Reptile(TinyMLP(dim, hidden=4), eval_inner_steps=5, bn_mode="running").double(),
    }


LEARNER_NAMES = list(_learners())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_query_order_and_support_order_invariance(name: str, target: str) -> None:
    learner = _learners()[name]
    ep = random_episode(target, 3, shots=3, queries=3, seed=5, dtype=torch.float64)
    logits = learner.predict(ep)
    assert logits.shape == (len(ep.query_labels), ep.description.num_outputs)
    assert torch.isfinite(logits).all()
    q = torch.randperm(len(ep.query_images), generator=torch.Generator().manual_seed(1))
    permuted_queries = learner.adapt(ep.support_images, ep.support_labels, ep.description)(ep.query_images[q])
    torch.testing.assert_close(permuted_queries, logits[q])
    if name == "matchingnet_fce":
        return  # the bidirectional LSTM reads the support set as a sequence (documented)
    s = torch.randperm(len(ep.support_images), generator=torch.Generator().manual_seed(2))
    permuted_support = learner.adapt(ep.support_images[s], ep.support_labels[s], ep.description)(ep.query_images)
    torch.testing.assert_close(permuted_support, logits)


@pytest.mark.parametrize("name", ["matchingnet", "relationnet", "feat", "r2d2", "reptile"])
def test_registered_episodic_learners_train_on_every_task_kind(name: str) -> None:
    from medmeta.backbones import create_backbone

    torch.manual_seed(0)
    kwargs = {"inner_steps": 2} if name == "reptile" else {}
    learner = create_learner(name, create_backbone("medmeta_conv4_tiny"), **kwargs)
    assert learner.training_kind == "episodic"
    eps = [random_episode(t, 3, size=16, seed=i) for i, t in enumerate(TARGETS)]
    loss = learner.meta_backward(eps)
    assert torch.isfinite(loss)
    grads = [p.grad for p in learner.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


# -- Reptile: the pseudo-gradient is theta - phi ----------------------------------------------------------
def _reference_phi(model: TinyMLP, images: torch.Tensor, labels: torch.Tensor, target: str, n_out: int, steps: int, lr: float):
    """k plain SGD steps with autograd on backbone + a zero head (the hand-written inner loop)."""
    w, b = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    hw, hb = torch.zeros(n_out, model.num_features, dtype=w.dtype), torch.zeros(n_out, dtype=w.dtype)
    for _ in range(steps):
        params = [t.requires_grad_(True) for t in (w, b, hw, hb)]
        feats = torch.tanh(images.flatten(1) @ params[0].T + params[1])
        loss = task_loss(feats @ params[2].T + params[3], labels, target)
        grads = torch.autograd.grad(loss, params)
        w, b, hw, hb = (p.detach() - lr * g for p, g in zip(params, grads))
    return w, b


@pytest.mark.parametrize("target", ["MULTICLASS_CLASSIFICATION", "MULTILABEL_CLASSIFICATION"])
def test_reptile_writes_theta_minus_phi_and_sgd_lr_one_moves_to_the_mean_phi(target: str) -> None:
    torch.manual_seed(0)
    steps, lr = 3, 0.5
    learner = Reptile(TinyMLP(3 * 4 * 4, hidden=3), inner_steps=steps, inner_lr=lr).double()
    eps = [random_episode(target, 2, shots=2, queries=2, size=4, seed=s, dtype=torch.float64) for s in (0, 1)]
    theta_w, theta_b = learner.backbone.fc.weight.detach().clone(), learner.backbone.fc.bias.detach().clone()
    phis = []
    for ep in eps:
        images = torch.cat([ep.support_images, ep.query_images])
        labels = torch.cat([ep.support_labels, ep.query_labels])
        phis.append(_reference_phi(learner.backbone, images, labels, target, ep.description.num_outputs, steps, lr))
    learner.zero_grad()
    loss = learner.meta_backward(eps, scale=0.5)
    assert torch.isfinite(loss)
    mean_w = (phis[0][0] + phis[1][0]) / 2
    mean_b = (phis[0][1] + phis[1][1]) / 2
    torch.testing.assert_close(learner.backbone.fc.weight.grad, theta_w - mean_w)
    torch.testing.assert_close(learner.backbone.fc.bias.grad, theta_b - mean_b)
    assert not torch.equal(mean_w, theta_w)  # the inner loop moved the backbone
    # the surrogate meta_loss has the same gradient
    grads = (learner.backbone.fc.weight.grad.clone(), learner.backbone.fc.bias.grad.clone())
    learner.zero_grad()
    learner.meta_loss(eps).backward()
    torch.testing.assert_close(learner.backbone.fc.weight.grad, grads[0])
    torch.testing.assert_close(learner.backbone.fc.bias.grad, grads[1])
    # SGD with lr=1 applies the classic Reptile step with epsilon = 1: theta <- mean(phi)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    learner.zero_grad()
    learner.meta_backward(eps, scale=0.5)
    opt.step()
    torch.testing.assert_close(learner.backbone.fc.weight.detach(), mean_w)
    torch.testing.assert_close(learner.backbone.fc.bias.detach(), mean_b)


def test_reptile_fixes_its_first_order_settings() -> None:
    with pytest.raises(ValueError, match="first_order"):
        Reptile(TinyMLP(4), first_order=False)
    assert Reptile(TinyMLP(4)).first_order


# -- equality with easyfsl on the same features ---------------------------------------------------
def _easyfsl_episode(seed: int, n_way: int = 3, shots: int = 2, queries: int = 4, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way).repeat_interleave(shots)
    return labels, torch.randn(len(labels), dim, generator=g), torch.randn(queries, dim, generator=g)


def test_matchingnet_with_fce_equals_easyfsl() -> None:
    methods = pytest.importorskip("easyfsl.methods")
    labels, support, query = _easyfsl_episode(0)
    torch.manual_seed(0)
    reference = methods.MatchingNetworks(torch.nn.Identity(), feature_dimension=support.shape[1]).eval()
    learner = MatchingNet(Flatten(support.shape[1]), fce=True).eval()
    learner.support_encoder.load_state_dict(reference.support_features_encoder.state_dict())
    learner.query_encoder.load_state_dict(reference.query_features_encoding_cell.state_dict())
    with torch.no_grad():
        reference.process_support_set(support, labels)
        expected = reference(query)
    got = learner.adapt_features(support, labels, description("MULTICLASS_CLASSIFICATION", 3))(query)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_relationnet_equals_easyfsl_with_the_same_relation_module() -> None:
    methods = pytest.importorskip("easyfsl.methods")
    labels, support, query = _easyfsl_episode(1)
    torch.manual_seed(0)
    learner = RelationNet(Flatten(support.shape[1]), hidden=7).eval()
    # easyfsl wants feature maps: give it (N, D, 1, 1) and the same MLP on the flattened pairs
    module = torch.nn.Sequential(torch.nn.Flatten(), learner.relation)
    reference = methods.RelationNetworks(torch.nn.Identity(), feature_dimension=support.shape[1], relation_module=module)
    with torch.no_grad():
        reference.process_support_set(support[:, :, None, None], labels)
        expected = reference(query[:, :, None, None])
    got = learner.adapt_features(support, labels, description("MULTICLASS_CLASSIFICATION", 3))(query)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("heads", [1, 2])
def test_feat_equals_easyfsl_with_the_same_attention_weights(heads: int) -> None:
    methods = pytest.importorskip("easyfsl.methods")
    modules = pytest.importorskip("easyfsl.modules")
    labels, support, query = _easyfsl_episode(2 + heads)
    dim = support.shape[1]
    torch.manual_seed(heads)
    attention = modules.MultiHeadAttention(heads, dim, dim, dim)
    reference = methods.FEAT(torch.nn.Identity(), attention_module=attention).eval()
    learner = FEAT(Flatten(dim), heads=heads, temperature=1.0).eval()
    learner.attention.load_state_dict(attention.state_dict())
    with torch.no_grad():
        reference.process_support_set(support, labels)
        expected = reference(query)  # -|q - p'| (not squared)
    d = description("MULTICLASS_CLASSIFICATION", 3)
    torch.testing.assert_close(learner.adapted_prototypes(support, labels, d).positive, reference.prototypes)
    got = learner.adapt_features(support, labels, d)(query)
    torch.testing.assert_close(got, -(expected**2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["matchingnet", "relationnet", "feat", "r2d2", "reptile"])
def test_trained_parts_round_trip_through_the_one_checkpoint_format(name: str, tmp_path) -> None:
    from medmeta.learners import load_learner, save_learner

    kwargs = {"fce": True} if name == "matchingnet" else {}
    torch.manual_seed(0)
    trained = create_learner(name, TinyMLP(3 * 8 * 8, hidden=4), **kwargs)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_learner(tmp_path / "learner.pt", trained)
    torch.manual_seed(1)
    fresh = create_learner(name, TinyMLP(3 * 8 * 8, hidden=4), **kwargs)
    load_learner(tmp_path / "learner.pt", fresh)
    ep = random_episode("MULTILABEL_CLASSIFICATION", 3, seed=3)
    torch.testing.assert_close(fresh.predict(ep), trained.predict(ep))


def test_mm_pt_with_a_cosine_head_trains_and_tests_with_baseline_pp() -> None:
    from medmeta.learners import TaskBatch

    torch.manual_seed(0)
    tasks = [description(t, 3, f"d{i}: t") for i, t in enumerate(TARGETS)]
    model = MultiTaskPretrainer(TinyMLP(3 * 8 * 8, hidden=4), tasks, head="cosine", eval_learner="baseline_pp")
    g = torch.Generator().manual_seed(0)
    batch = [
        TaskBatch(i, torch.randn(4, 3, 8, 8, generator=g), labels_for(t, tasks[i].num_classes, 2, g)[:4])
        for i, t in enumerate(TARGETS)
    ]
    model.loss(batch).backward()
    assert all(h.weight.grad is not None and bool(h.weight.grad.abs().sum() > 0) for h in model.heads)
    assert isinstance(model.as_learner(), BaselinePP)
    ep = random_episode("BINARY_CLASSIFICATION", 2, seed=4)
    assert model.adapt(ep.support_images, ep.support_labels, ep.description)(ep.query_images).shape == (len(ep.query_labels), 1)
