"""Linear probe against scikit-learn's logistic regression; fine-tuning protocol behaviour."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_fixtures import Flatten, description, random_episode

from medmeta.backbones import create_backbone
from medmeta.learners import FineTune, LinearProbe, MedIMetaAugment, fit_linear_head


def _toy(n_classes: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d))
    x = centres[y] + 1.5 * rng.normal(size=(n, d))
    return torch.tensor(x, dtype=torch.float64), y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probe_solution_equals_sklearn_logistic_regression(n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _toy(n_classes, 24, 5, seed=n_classes)
    wd = 0.05
    if n_classes == 2:
        d = description("BINARY_CLASSIFICATION", 2)
        labels = torch.tensor(y, dtype=torch.float32)[:, None]
    else:
        d = description("MULTICLASS_CLASSIFICATION", n_classes)
        labels = torch.tensor(y)
    w, b = fit_linear_head(x, labels, d, weight_decay=wd, max_iter=500)
    # ours: mean loss + wd/2 |W|^2  ==  sklearn: C * sum loss + 1/2 |W|^2 with C = 1 / (n * wd)
    ref = LogisticRegression(C=1.0 / (len(y) * wd), tol=1e-10, max_iter=10000).fit(x.numpy(), y)
    np.testing.assert_allclose(w.numpy(), ref.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), ref.intercept_, rtol=1e-4, atol=1e-5)
    # the Adam solver heads for the same optimum
    w2, _ = fit_linear_head(x, labels, d, weight_decay=wd, solver="adam", max_iter=3000, lr=0.05)
    np.testing.assert_allclose(w2.numpy(), ref.coef_, atol=2e-3)


def test_linear_probe_learner_uses_frozen_features_and_every_task_kind() -> None:
    torch.manual_seed(0)
    learner = LinearProbe(create_backbone("medmeta_conv4_tiny"), normalize="standardize")
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    for target in ("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION", "ORDINAL_REGRESSION"):
        ep = random_episode(target, 3, size=16, seed=3)
        logits = learner.predict(ep)
        assert logits.shape == (ep.n_query, ep.description.num_outputs)
        feats = learner.embed_no_grad(ep.support_images)
        torch.testing.assert_close(learner.adapt_features(feats, ep.support_labels, ep.description)(learner.embed_no_grad(ep.query_images)), logits)
    assert learner.frozen_backbone
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_linear_probe_fits_separable_support_perfectly() -> None:
    x = torch.tensor([[1.0, 0.0], [2.0, 0.5], [-1.0, 0.2], [-2.0, -0.3]], dtype=torch.float64)[:, None, None, :]
    y = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    learner = LinearProbe(Flatten(2).double(), weight_decay=1e-4)
    logits = learner.adapt(x, y, description("BINARY_CLASSIFICATION", 2))(x)
    assert ((logits > 0).float() == y).all()


def test_finetune_defaults_follow_medimeta_and_backbone_never_changes() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("medmeta_conv4_tiny")
    learner = FineTune(backbone)
    assert (learner.steps, learner.lr, learner.optimizer, learner.backbone_lr) == (50, 1e-3, "adam", 1e-3)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, shots=3, size=16, seed=1)
    net = learner.fine_tune(ep.support_images, ep.support_labels, ep.description)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k
    # every parameter of the copy moved (full fine-tuning), and the support loss went down
    moved = [not torch.equal(a, b) for a, b in zip(net[0].parameters(), backbone.parameters())]
    assert all(moved)
    start = FineTune(backbone, steps=0).fine_tune(ep.support_images, ep.support_labels, ep.description)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(net(ep.support_images), ep.support_labels) < 0.5 * ce(start(ep.support_images), ep.support_labels)
    head_only = FineTune(backbone, steps=5, backbone_lr=0.0).fine_tune(ep.support_images, ep.support_labels, ep.description)
    for a, b in zip(head_only[0].parameters(), backbone.parameters()):
        assert torch.equal(a, b)


def test_finetune_minibatches_and_augmentation_are_applied() -> None:
    seen: list[int] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x

    torch.manual_seed(0)
    learner = FineTune(create_backbone("medmeta_conv4_tiny"), steps=5, batch_size=4, augment=augment)
    for target in ("BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION", "ORDINAL_REGRESSION"):
        seen.clear()
        ep = random_episode(target, 3, shots=3, size=16, seed=2)
        logits = learner.predict(ep)
        assert logits.shape == (ep.n_query, ep.description.num_outputs)
        n = ep.n_support
        assert len(seen) == 5 and all(s <= 4 for s in seen)
        assert sum(seen[: -(-n // 4)]) == n  # the first pass covers the support set once


def test_medimeta_augment_is_per_image_and_reduces_to_the_identity() -> None:
    x = torch.randn(6, 3, 16, 16)
    assert torch.equal(MedIMetaAugment(0, 0, 0, 0, 1.0, 0)(x), x)
    torch.testing.assert_close(MedIMetaAugment(1.0, 0, 0, 0, 1.0, 0)(x), x.flip(-1))
    torch.manual_seed(0)
    out = MedIMetaAugment()(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    with pytest.raises(ValueError, match="augment"):
        FineTune(create_backbone("medmeta_conv4_tiny"), augment="colour")
