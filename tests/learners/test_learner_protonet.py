"""ProtoNet logits against hand computation for every task kind, normalisations and training."""
from __future__ import annotations

import math

import pytest
import torch
from learner_fixtures import Flatten, description, random_episode

from medmeta.learners import ProtoNet
from medmeta.tasks import Episode

D = 3


def _images(rows: list[list[float]]) -> torch.Tensor:
    """Feature rows as (N, 1, 1, D) images: the Flatten backbone returns them unchanged."""
    return torch.tensor(rows, dtype=torch.float64)[:, None, None, :]


SUPPORT = [[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 4.0, 0.0], [1.0, 1.0, 1.0], [3.0, -1.0, 2.0]]
QUERY = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]


def _sq(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def _cos_dist(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


def _learner(**kwargs) -> ProtoNet:
    return ProtoNet(Flatten(D).double(), **kwargs).double()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_multiclass_and_ordinal_logits_equal_hand_computation(distance: str) -> None:
    dist = _sq if distance == "euclidean" else _cos_dist
    labels = [0, 0, 1, 2, 2]
    protos = [_mean([SUPPORT[i] for i in range(5) if labels[i] == c]) for c in range(3)]
    expected = torch.tensor([[-dist(q, p) / 0.5 for p in protos] for q in QUERY], dtype=torch.float64)
    for target in ("MULTICLASS_CLASSIFICATION", "ORDINAL_REGRESSION"):
        learner = _learner(distance=distance, temperature=0.5)
        d = description(target, 3)
        got = learner.adapt(_images(SUPPORT), torch.tensor(labels), d)(_images(QUERY))
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_binary_logit_is_positive_minus_negative_prototype_distance(distance: str) -> None:
    dist = _sq if distance == "euclidean" else _cos_dist
    y = [1, 0, 0, 1, 1]
    pos = _mean([SUPPORT[i] for i in range(5) if y[i] == 1])
    neg = _mean([SUPPORT[i] for i in range(5) if y[i] == 0])
    expected = torch.tensor([[-dist(q, pos) + dist(q, neg)] for q in QUERY], dtype=torch.float64)
    got = _learner(distance=distance, temperature=1.0).adapt(
        _images(SUPPORT), torch.tensor(y, dtype=torch.float32)[:, None], description("BINARY_CLASSIFICATION", 2)
    )(_images(QUERY))
    torch.testing.assert_close(got, expected)
    # sigmoid(logit) is the softmax probability of the positive prototype among the two
    e_pos = [math.exp(-dist(q, pos)) for q in QUERY]
    e_neg = [math.exp(-dist(q, neg)) for q in QUERY]
    p = torch.tensor([[a / (a + b)] for a, b in zip(e_pos, e_neg)], dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(got), p)


def test_multilabel_has_a_positive_and_negative_prototype_per_label() -> None:
    y = [[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]]
    expected = []
    for q in QUERY:
        row = []
        for k in range(2):
            pos = _mean([SUPPORT[i] for i in range(5) if y[i][k] == 1])
            neg = _mean([SUPPORT[i] for i in range(5) if y[i][k] == 0])
            row.append((-_sq(q, pos) + _sq(q, neg)) / 2.0)
        expected.append(row)
    got = _learner(temperature=2.0).adapt(
        _images(SUPPORT), torch.tensor(y, dtype=torch.float32), description("MULTILABEL_CLASSIFICATION", 2)
    )(_images(QUERY))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_simpleshot_centres_by_stored_or_support_mean_then_l2() -> None:
    labels = [0, 0, 1, 2, 2]
    d = description("MULTICLASS_CLASSIFICATION", 3)

    def expected(centre: list[float]) -> torch.Tensor:
        def norm(v: list[float]) -> list[float]:
            c = [a - b for a, b in zip(v, centre)]
            n = math.sqrt(sum(x * x for x in c))
            return [x / n for x in c]

        sup = [norm(r) for r in SUPPORT]
        protos = [_mean([sup[i] for i in range(5) if labels[i] == c]) for c in range(3)]
        return torch.tensor([[-_sq(norm(q), p) for p in protos] for q in QUERY], dtype=torch.float64)

    learner = _learner(normalize="simpleshot")
    got = learner.adapt(_images(SUPPORT), torch.tensor(labels), d)(_images(QUERY))
    torch.testing.assert_close(got, expected(_mean(SUPPORT)))
    base_mean = [0.5, -0.5, 0.25]
    learner.set_feature_mean(torch.tensor(base_mean, dtype=torch.float64))
    got = learner.adapt(_images(SUPPORT), torch.tensor(labels), d)(_images(QUERY))
    torch.testing.assert_close(got, expected(base_mean))
    # the mean is part of the learner's state
    assert torch.equal(learner.state_dict()["feature_mean"], torch.tensor(base_mean, dtype=torch.float64))
    l2 = _learner(normalize="l2").adapt(_images(SUPPORT), torch.tensor(labels), d)(_images(QUERY))
    torch.testing.assert_close(l2, expected([0.0, 0.0, 0.0]))


def test_feature_path_equals_image_path_and_backbone_is_frozen() -> None:
    from medmeta.backbones import create_backbone

    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("medmeta_conv4_tiny"))
    learner.train()  # embed uses eval mode regardless
    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, size=16, seed=1)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    via_images = learner.predict(ep)
    feats = learner.adapt_features(learner.embed(ep.support_images).detach(), ep.support_labels, ep.description)
    via_features = feats(learner.embed(ep.query_images).detach())
    torch.testing.assert_close(via_images, via_features)
    assert learner.frozen_backbone and learner.training
    for k, v in learner.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_meta_loss_trains_the_backbone_and_a_learned_temperature() -> None:
    from medmeta.backbones import create_backbone

    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("medmeta_conv4_tiny"), distance="cosine", learn_temperature=True)
    assert learner.temperature.item() == pytest.approx(0.1)
    eps: list[Episode] = [
        random_episode(t, 3, size=16, seed=i)
        for i, t in enumerate(("MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION", "ORDINAL_REGRESSION"))
    ]
    loss = learner.meta_loss(eps)
    loss.backward()
    assert learner.log_temperature.grad is not None and learner.log_temperature.grad != 0
    assert all(p.grad is not None for p in learner.backbone.parameters())
    assert learner.episode_losses(eps).shape == (4,)
    with pytest.raises(ValueError, match="distance"):
        ProtoNet(create_backbone("medmeta_conv4_tiny"), distance="manhattan")
