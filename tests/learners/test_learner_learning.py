"""Every learner learns: held-out synthetic tasks are solved well above chance with a fixed seed.

Training tasks and held-out tasks use disjoint classes (different pattern templates); episodes
come from the project's seeded :class:`~medmeta.episodes.samplers.FewShotSampler`. The noise is
high enough that an untrained backbone is mediocre, so meta-training has to help.
"""
from __future__ import annotations

import pytest
import torch
from learner_fixtures import accuracy, pattern_source, sample_episodes

from medmeta.backbones import create_backbone
from medmeta.learners import MixedBatchSampler, MultiTaskPretrainer, create_learner

NOISE = 3.0
SIZE = 16


@pytest.fixture(scope="module")
def data() -> dict:
    train = pattern_source("MULTICLASS_CLASSIFICATION", 12, per_class=30, size=SIZE, noise=NOISE, seed=0, name="train: patterns")
    train_ml = pattern_source("MULTILABEL_CLASSIFICATION", 4, per_class=30, size=SIZE, noise=NOISE, seed=50, name="train: overlays")
    test_mc = pattern_source("MULTICLASS_CLASSIFICATION", 6, per_class=30, size=SIZE, noise=NOISE, seed=100, name="test: patterns")
    test_bin = pattern_source("BINARY_CLASSIFICATION", 2, per_class=30, size=SIZE, noise=NOISE, seed=200, name="test: binary")
    return {
        "train": train,
        "train_ml": train_ml,
        "held_out": sample_episodes(test_mc, 3, 5, 5, 8, seed=1) + sample_episodes(test_bin, 2, 5, 5, 4, seed=2),
    }


def _evaluate(learner, episodes) -> tuple[float, float]:
    """Mean query accuracy on multi-class and on binary held-out episodes."""
    learner.eval()
    mc, binary = [], []
    with torch.no_grad():
        for ep in episodes:
            acc = accuracy(learner.predict(ep), ep.query_labels, ep.description.task_target.value)
            (binary if ep.description.task_target.uses_sigmoid else mc).append(acc)
    return sum(mc) / len(mc), sum(binary) / len(binary)


def _meta_train(learner, data: dict, steps: int, lr: float = 3e-3, meta_batch: int = 3) -> None:
    from medmeta.episodes.samplers import FewShotSampler

    source = data["train"]
    sampler = FewShotSampler(source, n_way=3, n_shot=5, n_query=5, seed=7)
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    learner.train()
    for step in range(steps):
        episodes = [sampler.sample(step * meta_batch + i).materialize(source) for i in range(meta_batch)]
        opt.zero_grad()
        learner.meta_loss(episodes).backward()
        opt.step()


CHANCE = (1 / 3, 1 / 2)


def _assert_well_above_chance(accs: tuple[float, float], margin: tuple[float, float] = (0.3, 0.25)) -> None:
    assert accs[0] >= CHANCE[0] + margin[0], f"3-way accuracy {accs[0]:.3f} (chance {CHANCE[0]:.2f})"
    assert accs[1] >= CHANCE[1] + margin[1], f"binary accuracy {accs[1]:.3f} (chance {CHANCE[1]:.2f})"


@pytest.mark.slow
def test_meta_training_improves_maml_over_its_initialisation(data: dict) -> None:
    torch.manual_seed(0)
    learner = create_learner("maml", create_backbone("medmeta_conv4_tiny"))
    before = _evaluate(learner, data["held_out"])
    held_out_loss_before = float(learner.meta_loss(data["held_out"][:4]).detach())
    _meta_train(learner, data, steps=25)
    after = _evaluate(learner, data["held_out"])
    held_out_loss_after = float(learner.meta_loss(data["held_out"][:4]).detach())
    assert after[0] >= before[0] + 0.08, (before, after)
    assert after[1] >= before[1], (before, after)
    assert held_out_loss_after < 0.8 * held_out_loss_before
    _assert_well_above_chance(after)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fomaml", "anil", "metasgd", "protomaml", "protonet"])
def test_meta_learners_solve_held_out_tasks(name: str, data: dict) -> None:
    torch.manual_seed(0)
    learner = create_learner(name, create_backbone("medmeta_conv4_tiny"))
    _meta_train(learner, data, steps=20)
    _assert_well_above_chance(_evaluate(learner, data["held_out"]))


@pytest.mark.slow
def test_multitask_pretraining_then_finetune_and_probe_solve_held_out_tasks(data: dict) -> None:
    torch.manual_seed(0)
    sources = [data["train"], data["train_ml"]]
    model = MultiTaskPretrainer(create_backbone("medmeta_conv4_tiny"), [s.description for s in sources])
    probe_before = _evaluate(model.as_learner("linear_probe"), data["held_out"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(2):
        for batch in MixedBatchSampler(sources, batch_size=32, seed=epoch):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
    probe_after = _evaluate(model.as_learner("linear_probe"), data["held_out"])
    assert probe_after[0] > probe_before[0] + 0.1, (probe_before, probe_after)
    _assert_well_above_chance(probe_after)
    _assert_well_above_chance(_evaluate(model, data["held_out"]))  # default: MedIMeta fine-tuning


@pytest.mark.parametrize("name", ["finetune", "linear_probe", "protonet"])
def test_test_time_learners_beat_chance_without_meta_training(name: str, data: dict) -> None:
    """Fine-tuning, probing and prototypes on an untrained backbone still learn from the support."""
    torch.manual_seed(0)
    learner = create_learner(name, create_backbone("medmeta_conv4_tiny"))
    _assert_well_above_chance(_evaluate(learner, data["held_out"]), margin=(0.15, 0.05))
