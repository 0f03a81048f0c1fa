"""The training loop hands each learner its whole per-rank meta-batch in one ``meta_backward`` call.

Checked against the per-episode reference (``meta_loss([episode])`` under the episode's own seed,
scaled by ``1 / meta_batch_size`` and backpropagated one by one, the loop of earlier versions):
vmapped MAML reaches the same gradients, the task-by-task path the same gradients bit for bit
(dropout included), and two ranks' gradients sum to one process's.
"""
from __future__ import annotations

import copy

import pytest
import torch

from medmeta.backbones import create_backbone
from medmeta.episodes.samplers import FewShotSampler
from medmeta.errors import ConfigError
from medmeta.learners import MAML, FineTune, MultiTaskPretrainer, ProtoNet
from medmeta.learners.base import check_trainable, trainable_learners
from medmeta.tasks import Episode
from medmeta.training.distributed import DistributedContext
from medmeta.training.loop import EpisodicObjective, _SeededRNG, episode_seed

SEED = 11


def _objective(learner, tiny_meta, rank: int = 0, world_size: int = 1, meta_batch_size: int = 4) -> EpisodicObjective:
    source = tiny_meta.source("alpha", "lesion", "train")
    sampler = FewShotSampler(source, n_way=3, n_shot=2, n_query=2, seed=5)  # equal shapes: one vmap group
    ctx = DistributedContext(rank=rank, world_size=world_size)
    return EpisodicObjective(learner, sampler, source, meta_batch_size, ctx, SEED)


def _spy(learner) -> list[list[Episode]]:
    """Record the episodes of every ``meta_backward`` call (and still run it)."""
    calls: list[list[Episode]] = []
    original = learner.meta_backward

    def spy(episodes, *args, **kwargs):
        calls.append(list(episodes))
        return original(episodes, *args, **kwargs)

    learner.meta_backward = spy
    return calls


def _per_episode_reference(learner, episodes: list[Episode], meta_batch_size: int) -> torch.Tensor:
    """The loop of earlier versions: one ``meta_loss([episode])`` backward per episode, each seeded."""
    for ep in episodes:
        with _SeededRNG(episode_seed(SEED, "train-episode", int(ep.info["episode"])), torch.device("cpu")):
            (learner.meta_loss([ep]) / meta_batch_size).backward()
    return _grads(learner)


def _grads(learner) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])


def _maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    return MAML(create_backbone("medmeta_conv4_tiny", in_chans=1, **kwargs.pop("timm", {})), inner_steps=2, **kwargs)


def test_vmap_maml_gets_the_meta_batch_in_one_call_with_the_per_episode_gradients(tiny_meta) -> None:
    learner = _maml(vmap=True)
    reference = copy.deepcopy(learner)
    reference.vmap = False
    calls = _spy(learner)
    objective = _objective(learner, tiny_meta)
    out = objective.train_step(0)
    assert len(calls) == 1 and [int(e.info["episode"]) for e in calls[0]] == [0, 1, 2, 3]
    assert out["count"] == 4.0
    expected = _per_episode_reference(reference, calls[0], 4)
    torch.testing.assert_close(_grads(learner), expected, rtol=1e-5, atol=1e-6)
    losses = [float(reference.meta_loss([e]).detach()) for e in calls[0]]
    assert out["loss_sum"] == pytest.approx(sum(losses), rel=1e-5)
    # the next step continues the stream: episodes 4..7, again in one call
    learner.zero_grad()
    objective.train_step(1)
    assert len(calls) == 2 and [int(e.info["episode"]) for e in calls[1]] == [4, 5, 6, 7]


@pytest.mark.parametrize("make", [lambda: _maml(timm={"drop_rate": 0.3}), lambda: ProtoNet(create_backbone(
    "medmeta_conv4_tiny", in_chans=1, drop_rate=0.3))], ids=["maml", "protonet"])
def test_task_by_task_learners_reproduce_the_per_episode_loop_exactly(tiny_meta, make) -> None:
    """Dropout draws from each episode's own seed, so the numbers equal the earlier loop's."""
    torch.manual_seed(0)
    learner = make()
    reference = copy.deepcopy(learner)
    calls = _spy(learner)
    _objective(learner, tiny_meta).train_step(0)
    assert len(calls) == 1 and len(calls[0]) == 4
    assert torch.equal(_grads(learner), _per_episode_reference(reference, calls[0], 4))


def test_two_ranks_sum_to_one_process_gradient(tiny_meta) -> None:
    torch.manual_seed(0)
    single = _maml(timm={"drop_rate": 0.3})
    ranks = [copy.deepcopy(single), copy.deepcopy(single)]
    _objective(single, tiny_meta).train_step(0)
    for r, learner in enumerate(ranks):
        episodes = _spy(learner)
        _objective(learner, tiny_meta, rank=r, world_size=2).train_step(0)
        assert [int(e.info["episode"]) for e in episodes[0]] == [r, r + 2]
    torch.testing.assert_close(_grads(ranks[0]) + _grads(ranks[1]), _grads(single), rtol=1e-5, atol=1e-7)


def test_a_non_finite_meta_loss_names_the_episodes(tiny_meta) -> None:
    learner = _maml(inner_lr=1e30)
    with pytest.raises(FloatingPointError, match=r"step 0: the meta-loss of episode\(s\) 0 \(alpha/lesion\), 1 "):
        _objective(learner, tiny_meta).train_step(0)


def test_learners_declare_how_they_train() -> None:
    backbone = create_backbone("medmeta_conv4_tiny")
    assert check_trainable("protonet") == "episodic" and check_trainable(MAML(backbone)) == "episodic"
    assert check_trainable(MultiTaskPretrainer) == "pretraining"
    kinds = trainable_learners()
    assert kinds["maml"] == kinds["protonet"] == kinds["anil"] == "episodic"
    assert "linear_probe" not in kinds and "finetune" not in kinds
    with pytest.raises(ConfigError) as info:
        check_trainable("linear_probe")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("learner=linear_probe is not trainable (it adapts at test time only): evaluate it with "
                           "medmeta-evaluate +learner@learners.linear_probe=linear_probe, or train one of ")
    assert text.endswith(", ".join(sorted(kinds)))
    with pytest.raises(ConfigError, match=r"FineTune has no meta-training loss \(training_kind=None\)"):
        FineTune(backbone).meta_loss([])
    with pytest.raises(ConfigError, match="is not trained on episodes"):
        EpisodicObjective(FineTune(backbone), None, None, 4, DistributedContext(), 0)


def test_the_default_meta_backward_scales_the_meta_loss_gradient() -> None:
    """A learner that only writes ``meta_loss`` gets ``meta_backward`` from the base class."""
    from torch import nn

    from medmeta.learners.base import Learner

    class Mean(Learner):
        training_kind = "episodic"

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

        def meta_loss(self, episodes):
            return torch.stack([(self.w * float(k)).pow(2).sum() for k in episodes]).mean()

    learner = Mean()
    loss = learner.meta_backward([1, 2, 3], scale=0.5)  # episodes stand-ins: any sequence works here
    # d/dw of 0.5 * sum_k |k w|^2 = sum_k k^2 w = 14 w
    torch.testing.assert_close(learner.w.grad, 14.0 * torch.tensor([1.0, -2.0]))
    assert float(loss) == pytest.approx((1 + 4 + 9) * 5 / 3) and not loss.requires_grad
