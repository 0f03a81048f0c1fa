"""MIL heads: attention and pooling computed as the papers define them, padding-invariant,
trainable on bags whose label depends on a few instances."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta.adapters.slides.mil import ABMIL, CLAMSB, Bags, PoolMIL, create_mil_head, predict_mil, train_mil
from medmeta.tasks import TaskDescription, TaskTarget

BINARY = TaskDescription(TaskTarget.BINARY_CLASSIFICATION, ("neg", "pos"), "toy: mil", "toy")
THREE = TaskDescription(TaskTarget.MULTICLASS_CLASSIFICATION, ("a", "b", "c"), "toy: mil3", "toy")


def test_abmil_gated_attention_matches_the_formula():
    torch.manual_seed(0)
    m = ABMIL(6, 1, hidden=8, attention_dim=4)
    x = torch.randn(5, 6)
    logits, attn = m(x, return_attention=True)
    h = torch.relu(m.embed[0](x))
    scores = m.attention_w(torch.tanh(m.attention_v(h)) * torch.sigmoid(m.attention_u(h))).squeeze(-1)
    a = torch.softmax(scores, 0)
    assert torch.allclose(attn[0], a, atol=1e-6) and torch.isclose(attn.sum(), torch.tensor(1.0))
    assert torch.allclose(logits[0], m.classifier((a[:, None] * h).sum(0)), atol=1e-6)
    ungated = ABMIL(6, 1, gated=False)
    assert ungated.attention_u is None


@pytest.mark.parametrize("name", ["abmil", "mean", "max", "clam_sb"])
def test_padded_batches_equal_single_bags(name):
    torch.manual_seed(0)
    m = create_mil_head(name, 6, THREE).eval()
    bags = [torch.randn(n, 6) for n in (3, 7, 1)]
    batched = m(Bags(bags))
    single = torch.cat([m(b) for b in bags])
    assert batched.shape == (3, 3)
    assert torch.allclose(batched, single, atol=1e-5)


def test_mean_and_max_pooling():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    for pool, reduce in (("mean", lambda h: h.mean(0)), ("max", lambda h: h.amax(0))):
        m = PoolMIL(5, 1, hidden=3, pool=pool)
        h = torch.relu(m.embed[0](x))
        assert torch.allclose(m(x)[0], m.classifier(reduce(h)), atol=1e-6)


def test_clam_instance_loss_uses_top_and_bottom_attention():
    torch.manual_seed(0)
    m = CLAMSB(6, 1, hidden=8, k_sample=2)
    x = torch.randn(10, 6)
    loss = m.loss(x, torch.ones(1, 1), TaskTarget.BINARY_CLASSIFICATION)
    loss.backward()
    assert torch.isfinite(loss)
    assert m.instance_classifiers[1].weight.grad is not None and m.instance_classifiers[1].weight.grad.abs().sum() > 0
    assert m.instance_classifiers[0].weight.grad is None  # only the bag's class clusters (no subtyping)
    sub = CLAMSB(6, 3, k_sample=2, subtyping=True)
    sub.loss(x, torch.tensor([2]), TaskTarget.MULTICLASS_CLASSIFICATION).backward()
    assert all(c.weight.grad is not None for c in sub.instance_classifiers)


def _toy_bags(n, seed):
    """Positive bags hide 1-2 shifted instances among 10-20 noise instances."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n):
        x = rng.normal(size=(rng.integers(10, 21), 8)).astype(np.float32) * 0.01 + 0.02
        y = i % 2
        if y:
            x[: rng.integers(1, 3), :4] += 0.05
        bags.append(torch.from_numpy(x))
        labels.append(y)
    return Bags(bags), torch.tensor(labels, dtype=torch.float32)[:, None]


@pytest.mark.parametrize("name", ["abmil", "max", "clam_sb"])
def test_training_learns_bag_labels_from_few_instances(name):
    train, ytr = _toy_bags(20, 0)
    test, yte = _toy_bags(20, 1)
    torch.manual_seed(0)
    m = create_mil_head(name, 8, BINARY)
    history = train_mil(m, train, ytr, BINARY, epochs=15, lr=3e-3, seed=0)
    assert history[-1] < history[0]
    acc = ((predict_mil(m, test) > 0).float() == yte).float().mean()
    assert acc >= 0.9, acc


def test_train_mil_checks_its_inputs():
    bags, y = _toy_bags(4, 0)
    m = create_mil_head("abmil", 8, BINARY)
    with pytest.raises(ValueError, match="4 bags for 3 labels"):
        train_mil(m, bags, y[:3], BINARY)
    with pytest.raises(ValueError, match="expects labels of shape"):
        train_mil(m, bags, y.ravel(), BINARY)
    with pytest.raises(ValueError, match=r"unknown MIL head 'transmil'.*Known MIL heads: 'abmil', 'clam_sb', 'max', 'mean'"):
        create_mil_head("transmil", 8, BINARY)
    with pytest.raises(ValueError, match="non-empty"):
        Bags([torch.zeros(0, 8)])
