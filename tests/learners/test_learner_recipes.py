"""The recipe learners: P>M>F (``pmf``) and the cross-validated linear probe (``linear_probe_cv``).

Their hyper-parameter (PMF's fine-tuning learning rate, the probe's weight decay) is chosen from
the support set alone: the tests check that the query set cannot change the choice, that the
choice equals a hand-run of the same selection, that it is the obviously right one on
constructed problems, and that the order of the support set does not matter.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from learner_fixtures import TARGETS, Flatten, TinyMLP, accuracy, description, random_episode
from torch import Tensor, nn

from medmeta.errors import ConfigError
from medmeta.learners import LinearProbe, LinearProbeCV, ProtoNet, create_learner, fit_linear_head
from medmeta.learners.linear_probe import (
    DEFAULT_WEIGHT_DECAYS,
    canonical_order,
    cross_validate_weight_decay,
    stratified_folds,
)
from medmeta.learners.pmf import PMF, PMFAugment, pseudo_episode_split
from medmeta.tasks import Episode

MC = "MULTICLASS_CLASSIFICATION"


def _features(n_classes: int, shots: int, dim: int, seed: int, spread: float = 0.0) -> tuple[Tensor, Tensor]:
    """Gaussian features with class centres ``spread`` apart (0: labels independent of features)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(shots)
    centres = spread * torch.randn(n_classes, dim, generator=g)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


# -- linear probe with cross-validated weight decay ---------------------------------------------
def test_registered_names_build_the_recipes() -> None:
    assert isinstance(create_learner("linear_probe_cv", Flatten(4)), LinearProbeCV)
    assert create_learner("linear_probe_cv", Flatten(4)).select_weight_decay
    assert not create_learner("linear_probe", Flatten(4)).select_weight_decay
    assert isinstance(create_learner("pmf", Flatten(4)), PMF)


def test_stratified_folds_leave_one_out_per_class_when_shots_are_tiny() -> None:
    d = description(MC, 3)
    y = torch.arange(3).repeat_interleave(3)  # 3 shots < 5 folds: 3 folds, one example per class each
    folds = stratified_folds(y, d, 5)
    assert len(folds) == 3
    for fold in folds:
        assert sorted(y[fold].tolist()) == [0, 1, 2]
    assert sorted(torch.cat(folds).tolist()) == list(range(9))
    y8 = torch.arange(2).repeat_interleave(8)  # 8 shots, 5 folds: sizes 2,2,2,1,1 per class
    assert [len(f) for f in stratified_folds(y8, description(MC, 2), 5)] == [4, 4, 4, 2, 2]
    assert stratified_folds(torch.arange(3), d, 5) == []  # one example per class: no CV


def test_cv_choice_equals_a_hand_run_on_the_support_set() -> None:
    d = description(MC, 3)
    x, y = _features(3, 4, dim=6, seed=3, spread=1.0)
    grid = (1e-3, 1e-1, 10.0)
    probe = LinearProbeCV(Flatten(6), weight_decays=grid, cv_folds=4)
    probe.adapt_features(x, y, d)
    got = probe.last_selection
    assert got is not None and got.folds == 4
    # Hand-run: 4 folds, each holding one example of every class (in the canonical order).
    order = canonical_order(x, y)
    xs, ys = x[order], y[order]
    folds = [torch.tensor([c * 4 + f for c in range(3)]) for f in range(4)]  # xs is sorted by class
    hand = {}
    for w in grid:
        total = 0.0
        for held in folds:
            train = torch.tensor([i for i in range(12) if i not in held.tolist()])
            weight, bias = fit_linear_head(xs[train], ys[train], d, weight_decay=w)
            total += F.cross_entropy(xs[held] @ weight.T + bias, ys[held], reduction="sum").item()
        hand[w] = total / 12
    assert got.scores == pytest.approx(hand, rel=1e-5)
    assert got.weight_decay == min(grid, key=lambda w: hand[w])


@pytest.mark.parametrize("seed", range(3))
def test_cv_picks_the_obviously_right_weight_decay(seed: int) -> None:
    d = description(MC, 4)
    # Features that carry no information about the labels: a heavy penalty (a head that predicts
    # the class frequencies) beats a nearly unpenalised head that fits the noise.
    x, y = _features(4, 6, dim=100, seed=seed, spread=0.0)
    assert cross_validate_weight_decay(x, y, d, (1e-4, 100.0), folds=3).weight_decay == 100.0
    # Well-separated classes: the lightest penalty gives the most confident correct predictions.
    x, y = _features(4, 6, dim=100, seed=seed, spread=5.0)
    assert cross_validate_weight_decay(x, y, d, (1e-4, 1e-2, 100.0), folds=3).weight_decay == 1e-4


def test_cv_falls_back_to_weight_decay_with_one_shot() -> None:
    x, y = _features(3, 1, dim=5, seed=0, spread=1.0)
    probe = LinearProbeCV(Flatten(5), weight_decay=0.5)
    probe.adapt_features(x, y, description(MC, 3))
    assert probe.last_selection is not None
    assert probe.last_selection.weight_decay == 0.5 and probe.last_selection.folds == 0


def test_cv_choice_never_looks_at_the_query_set() -> None:
    ep = random_episode(MC, n_classes=3, shots=4, queries=5, size=3, seed=1)
    probe = LinearProbeCV(Flatten(27), weight_decays=(1e-3, 1e-1, 10.0))
    probe.predict(ep)
    first = probe.last_selection
    g = torch.Generator().manual_seed(9)
    other = Episode(
        ep.support_images, ep.support_labels, torch.randn(7, 3, 3, 3, generator=g) * 100,
        ep.query_labels[torch.randperm(len(ep.query_labels), generator=g)][:7], ep.description,
    )
    probe.predict(other)
    assert probe.last_selection == first


def test_cv_probe_is_invariant_to_the_order_of_the_support_set() -> None:
    d = description(MC, 3)
    x, y = _features(3, 5, dim=8, seed=4, spread=1.0)
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    probe = LinearProbeCV(Flatten(8), normalize="standardize")
    logits = probe.adapt_features(x, y, d)(q)
    first = probe.last_selection
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(6))
    assert torch.equal(probe.adapt_features(x[perm], y[perm], d)(q), logits)
    assert probe.last_selection == first


@pytest.mark.parametrize("target", TARGETS)
def test_cv_probe_handles_every_task_kind(target: str) -> None:
    ep = random_episode(target, n_classes=3, shots=4, queries=2, size=2, seed=2)
    probe = LinearProbeCV(Flatten(12), weight_decays=(1e-2, 1.0), cv_folds=3)
    logits = probe.predict(ep)
    assert logits.shape == (len(ep.query_labels), ep.description.num_outputs)
    assert torch.isfinite(logits).all()
    assert probe.last_selection is not None and probe.last_selection.folds >= 2
    assert probe.last_selection.weight_decay in (1e-2, 1.0)


def test_default_linear_probe_is_unchanged_by_the_cv_option() -> None:
    ep = random_episode(MC, n_classes=3, shots=3, queries=2, size=2, seed=7)
    probe = LinearProbe(Flatten(12))
    assert probe.weight_decays == DEFAULT_WEIGHT_DECAYS and not probe.select_weight_decay
    weight, bias = fit_linear_head(ep.support_images.flatten(1), ep.support_labels, ep.description, weight_decay=1e-3)
    assert torch.equal(probe.predict(ep), ep.query_images.flatten(1) @ weight.T + bias)
    assert probe.last_selection is None


def test_cv_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="cv_folds"):
        LinearProbeCV(Flatten(2), cv_folds=1)
    with pytest.raises(ConfigError, match="weight_decays"):
        LinearProbeCV(Flatten(2), weight_decays=[-1.0])
    with pytest.raises(ConfigError, match="select_weight_decay"):
        LinearProbeCV(Flatten(2), select_weight_decay=False)


# -- P>M>F ------------------------------------------------------------------------------------------
class Blind(nn.Module):
    """Linear features that start reading only channel 1; :func:`_channel_episode` puts the class
    signal in channel 0 only, so without fine-tuning the features are useless."""

    def __init__(self, size: int, k: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        weight = torch.zeros(k, 3, size, size)
        weight[:, 1] = torch.randn(k, size, size, generator=g) / size
        self.fc = nn.Linear(3 * size * size, k)
        with torch.no_grad():
            self.fc.weight.copy_(weight.flatten(1))
            self.fc.bias.zero_()
        self.num_features = k

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def _channel_episode(shots: int, queries: int, seed: int, n_classes: int = 3, size: int = 4) -> Episode:
    g = torch.Generator().manual_seed(seed)
    templates = 3.0 * torch.randn(n_classes, size, size, generator=torch.Generator().manual_seed(100))

    def images(labels: Tensor) -> Tensor:
        x = torch.randn(len(labels), 3, size, size, generator=g)
        x[:, 0] += templates[labels]
        return x

    sy = torch.arange(n_classes).repeat_interleave(shots)
    qy = torch.arange(n_classes).repeat_interleave(queries)
    return Episode(images(sy), sy, images(qy), qy, description(MC, n_classes))


def test_pmf_fine_tunes_when_the_backbone_is_blind_and_gains_accuracy() -> None:
    ep = _channel_episode(shots=5, queries=20, seed=0)
    backbone = Blind(4)
    before = copy.deepcopy(backbone.state_dict())
    pmf = PMF(backbone, steps=20, lrs=(0.1,), augment=None)
    torch.manual_seed(0)
    logits = pmf.predict(ep)
    assert pmf.last_selection is not None and pmf.last_selection.lr == 0.1
    assert pmf.last_selection.scores[0.1][0] > pmf.last_selection.scores[0.0][0]
    plain = ProtoNet(backbone, distance="cosine").predict(ep)
    assert accuracy(logits, ep.query_labels, MC) >= accuracy(plain, ep.query_labels, MC) + 0.2
    for key, value in backbone.state_dict().items():  # the learner's own backbone never changes
        assert torch.equal(value, before[key])


def test_pmf_keeps_lr_zero_when_fine_tuning_destroys_the_features() -> None:
    ep = _channel_episode(shots=5, queries=5, seed=1)
    torch.manual_seed(0)
    backbone = TinyMLP(3 * 4 * 4, hidden=6)
    with torch.no_grad():
        backbone.fc.weight.zero_()
        backbone.fc.weight.view(6, 3, 4, 4)[:, 0] = torch.randn(6, 4, 4) / 4  # already informative
    pmf = PMF(backbone, steps=5, lrs=(1e4,), augment=None)
    torch.manual_seed(0)
    pmf.predict(ep)
    assert pmf.last_selection is not None and pmf.last_selection.lr == 0.0
    assert pmf.last_selection.scores[0.0][0] > pmf.last_selection.scores[1e4][0]


def _hand_fine_tune(backbone: nn.Module, x: Tensor, y: Tensor, n_classes: int, lr: float, steps: int) -> nn.Module:
    """P>M>F's F step written out for multi-class, cosine distance, temperature 0.1, no augmentation."""
    model = copy.deepcopy(backbone)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    onehot = F.one_hot(y, n_classes).float()
    for _ in range(steps):
        f = model(x)
        protos = (onehot.T @ f) / onehot.sum(0)[:, None]
        logits = -(1 - F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T) / 0.1
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_pmf_lr_choice_equals_a_hand_run_on_pseudo_episodes_of_the_support_set() -> None:
    ep = _channel_episode(shots=4, queries=3, seed=2)
    backbone = Blind(4)
    lrs = (0.0, 0.003, 0.3)
    pmf = PMF(backbone, steps=4, select_steps=6, lrs=lrs, augment=None, pseudo_episodes=1, pseudo_shots=2)
    torch.manual_seed(11)
    pmf.predict(ep)
    got = pmf.last_selection
    assert got is not None and got.pseudo_episodes == 1
    # Hand-run: the same split (same RNG draws on the canonically ordered support), then each lr.
    order = canonical_order(ep.support_images, ep.support_labels)
    sx, sy = ep.support_images[order], ep.support_labels[order]
    torch.manual_seed(11)
    split = pseudo_episode_split(sy, ep.description, pseudo_shots=2)
    assert split is not None
    ps, pq = split
    assert sorted(sy[ps].tolist()) == [0, 0, 1, 1, 2, 2] and len(pq) == 6
    hand = {}
    for lr in lrs:
        model = _hand_fine_tune(backbone, sx[ps], sy[ps], 3, lr, 6) if lr else backbone
        with torch.no_grad():
            f, q = model(sx[ps]), model(sx[pq])
        onehot = F.one_hot(sy[ps], 3).float()
        protos = (onehot.T @ f) / onehot.sum(0)[:, None]
        logits = -(1 - F.normalize(q, dim=1) @ F.normalize(protos, dim=1).T) / 0.1
        hand[lr] = ((logits.argmax(1) == sy[pq]).float().mean().item(), F.cross_entropy(logits, sy[pq]).item())
    for lr in lrs:
        assert got.scores[lr] == pytest.approx(hand[lr], rel=1e-4, abs=1e-6)
    assert got.lr == min(lrs, key=lambda lr: (-hand[lr][0], hand[lr][1], lr))


def test_pmf_choice_never_looks_at_the_query_set() -> None:
    ep = _channel_episode(shots=3, queries=4, seed=3)
    pmf = PMF(Blind(4), steps=2, lrs=(0.01, 0.1), pseudo_episodes=2)
    torch.manual_seed(5)
    pmf.predict(ep)
    first = pmf.last_selection
    g = torch.Generator().manual_seed(1)
    other = Episode(
        ep.support_images, ep.support_labels, torch.randn(5, 3, 4, 4, generator=g),
        ep.query_labels[torch.randperm(len(ep.query_labels), generator=g)][:5], ep.description,
    )
    torch.manual_seed(5)
    pmf.predict(other)
    assert pmf.last_selection == first


def test_pmf_is_invariant_to_the_order_of_the_support_set() -> None:
    ep = _channel_episode(shots=3, queries=4, seed=4)
    pmf = PMF(Blind(4), steps=3, lrs=(0.05,), pseudo_episodes=2)  # with the paper's augmentation
    torch.manual_seed(7)
    logits = pmf.predict(ep)
    first = pmf.last_selection
    perm = torch.randperm(len(ep.support_labels), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(7)
    permuted = pmf.adapt(ep.support_images[perm], ep.support_labels[perm], ep.description)(ep.query_images)
    assert torch.equal(permuted, logits)
    assert pmf.last_selection == first


def test_pmf_without_fine_tuning_is_protonet() -> None:
    ep = random_episode(MC, n_classes=3, shots=1, queries=3, size=3, seed=5)  # 1 shot: no pseudo-query
    pmf = PMF(Flatten(27), steps=5, lrs=(0.1,))
    logits = pmf.predict(ep)
    assert pmf.last_selection is not None and pmf.last_selection.lr == 0.0
    assert pmf.last_selection.pseudo_episodes == 0
    assert torch.allclose(logits, ProtoNet(Flatten(27), distance="cosine").predict(ep), atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_pmf_handles_every_task_kind(target: str) -> None:
    ep = random_episode(target, n_classes=3, shots=3, queries=2, size=4, seed=6)
    pmf = PMF(TinyMLP(48, hidden=4), steps=2, lrs=(0.01,), pseudo_episodes=1)
    torch.manual_seed(0)
    logits = pmf.predict(ep)
    assert logits.shape == (len(ep.query_labels), ep.description.num_outputs)
    assert torch.isfinite(logits).all()
    assert pmf.last_selection is not None and set(pmf.last_selection.scores) == {0.0, 0.01}


def test_multilabel_pseudo_support_covers_every_label_sign() -> None:
    ep = random_episode("MULTILABEL_CLASSIFICATION", n_classes=4, shots=3, queries=1, seed=8)
    torch.manual_seed(0)
    for _ in range(5):
        split = pseudo_episode_split(ep.support_labels, ep.description, pseudo_shots=1)
        assert split is not None
        ps, pq = split
        y = ep.support_labels[ps]
        assert bool((y == 1).any(0).all()) and bool((y == 0).any(0).all())
        assert sorted(torch.cat([ps, pq]).tolist()) == list(range(len(ep.support_labels)))


def test_pmf_augment_keeps_shapes_and_is_identity_with_p_zero() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(PMFAugment(p=0.0)(x), x)
    torch.manual_seed(0)
    y = PMFAugment(p=1.0)(x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_pmf_cannot_adapt_on_cached_features_and_checks_options() -> None:
    pmf = PMF(Flatten(4))
    assert not pmf.frozen_backbone and pmf.training_kind == "episodic"
    with pytest.raises(NotImplementedError, match="cached features"):
        pmf.adapt_features(torch.zeros(2, 4), torch.tensor([0, 1]), description(MC, 2))
    with pytest.raises(ConfigError, match="lrs"):
        PMF(Flatten(4), lrs=[-0.1])
    with pytest.raises(ConfigError, match="augment"):
        PMF(Flatten(4), augment="nope")
