"""mm-PT batches and loss, learner checkpoints, registry, bad input and reproducibility."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from learner_fixtures import pattern_source, random_episode

from medmeta.backbones import create_backbone
from medmeta.errors import ConfigError
from medmeta.learners import (
    MAML,
    FineTune,
    LinearProbe,
    MetaSGD,
    MixedBatchSampler,
    MultiTaskPretrainer,
    ProtoNet,
    TaskBatch,
    create_learner,
    list_learners,
    load_learner,
    save_learner,
)


def _sources():
    return [
        pattern_source("MULTICLASS_CLASSIFICATION", 3, per_class=5, size=16, seed=0, name="a: mc"),
        pattern_source("BINARY_CLASSIFICATION", 2, per_class=4, size=16, seed=1, name="b: bin"),
        pattern_source("MULTILABEL_CLASSIFICATION", 2, per_class=3, size=16, seed=2, name="c: ml"),
    ]


def test_mixed_batches_cover_every_item_once_per_epoch_with_encoded_labels() -> None:
    sources = _sources()
    sampler = MixedBatchSampler(sources, batch_size=7, seed=3)
    seen = []
    for batch in sampler:
        assert sum(len(p.images) for p in batch) <= 7
        for part in batch:
            src = sources[part.task_index]
            torch.testing.assert_close(part.images, src.read_images(part.positions))
            raw = src.labels[part.positions]
            if part.task_index == 0:
                assert torch.equal(part.labels, torch.as_tensor(raw))  # keys 0..2 are positions
            elif part.task_index == 1:
                assert torch.equal(part.labels, torch.as_tensor(raw, dtype=torch.float32)[:, None])
            else:
                assert torch.equal(part.labels, torch.as_tensor(raw, dtype=torch.float32))
            seen += [(part.task_index, int(p)) for p in part.positions]
    total = sum(len(s) for s in sources)
    assert len(seen) == total == len(set(seen)) and len(list(sampler)) == len(sampler) == -(-total // 7)
    again = [[(p.task_index, p.positions.tolist()) for p in b] for b in MixedBatchSampler(sources, 7, seed=3)]
    first = [[(p.task_index, p.positions.tolist()) for p in b] for b in MixedBatchSampler(sources, 7, seed=3)]
    assert again == first
    second_epoch = [[(p.task_index, p.positions.tolist()) for p in b] for b in sampler]  # epoch 2 of sampler
    assert second_epoch != first[: len(second_epoch)] or len(first) == 1
    uniform = MixedBatchSampler(sources, batch_size=8, seed=0, sampling="uniform")
    counts = np.zeros(3)
    for batch in uniform:
        for p in batch:
            counts[p.task_index] += len(p.images)
    assert counts.sum() == total and (counts > 0).all()  # tasks drawn uniformly, same epoch length


def test_multitask_loss_is_the_example_weighted_mean_of_task_losses() -> None:
    torch.manual_seed(0)
    sources = _sources()
    model = MultiTaskPretrainer(create_backbone("medmeta_conv4_tiny"), [s.description for s in sources])
    assert [h.out_features for h in model.heads] == [3, 1, 2]
    batch = next(iter(MixedBatchSampler(sources, batch_size=12, seed=1)))
    model.eval()  # BatchNorm with running statistics: per-part forward passes equal the joint one
    loss = model.loss(batch)
    manual = 0.0
    for part in batch:
        logits = model.heads[part.task_index](model.backbone(part.images))
        if part.task_index == 0:
            manual += F.cross_entropy(logits, part.labels) * len(part.images)
        else:
            manual += F.binary_cross_entropy_with_logits(logits, part.labels) * len(part.images)
    torch.testing.assert_close(loss, manual / sum(len(p.images) for p in batch))
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    # test time: a fresh head by fine-tuning (default) or a linear probe on the shared backbone
    assert isinstance(model.as_learner(), FineTune) and model.as_learner().backbone is model.backbone
    assert isinstance(model.as_learner("linear_probe"), LinearProbe)
    ep = random_episode("MULTICLASS_CLASSIFICATION", 4, size=16, seed=1)
    assert model.predict(ep).shape == (ep.n_query, 4)
    with pytest.raises(ValueError, match="task index 5"):
        model.loss([TaskBatch(5, batch[0].images, batch[0].labels)])
    with pytest.raises(ConfigError, match=r"training_kind='pretraining'.*loss\(batch\).*MixedBatchSampler"):
        model.meta_loss([ep])


def test_registry_knows_every_learner_and_explains_unknown_names() -> None:
    assert {"protonet", "linear_probe", "finetune", "maml", "fomaml", "anil", "metasgd", "protomaml"} <= set(list_learners())
    backbone = create_backbone("medmeta_conv4_tiny")
    fo = create_learner("fomaml", backbone, inner_steps=2)
    assert fo.first_order and fo.inner_steps == 2
    assert create_learner("anil", backbone).head_only and create_learner("protomaml", backbone).head_init == "proto"
    assert create_learner("metasgd", backbone).learn_inner_lr and isinstance(create_learner("protonet", backbone), ProtoNet)
    with pytest.raises(ValueError, match="known learners"):
        create_learner("no_such_learner", backbone)
    with pytest.raises(TypeError, match="maml"):
        create_learner("maml", backbone, inner_stpes=3)


def test_checkpoint_round_trip_restores_learner_and_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    learner = MetaSGD(create_backbone("medmeta_conv4_tiny"), inner_steps=1)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, size=16, seed=0)
    learner.meta_loss([ep]).backward()
    opt.step()
    path = save_learner(tmp_path / "ckpt" / "learner.pt", learner, opt, extra={"step": 1, "best": 0.5, "rng": torch.get_rng_state()})
    assert [p.name for p in path.parent.iterdir()] == ["learner.pt"]  # no temporary files left
    torch.manual_seed(1)
    other = MetaSGD(create_backbone("medmeta_conv4_tiny"), inner_steps=1)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    extra = load_learner(path, other, other_opt)
    assert extra["step"] == 1 and extra["best"] == 0.5
    for (k, a), b in zip(learner.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    with pytest.raises(TypeError, match="extra"):
        save_learner(tmp_path / "bad.pt", learner, extra={"fn": print})
    assert not (tmp_path / "bad.pt").exists()


def test_checkpoint_for_another_architecture_says_what_differs(tmp_path: Path) -> None:
    path = save_learner(tmp_path / "maml.pt", MAML(create_backbone("medmeta_conv4_tiny")))
    with pytest.raises(ValueError, match=r"backbone: checkpoint 'medmeta_conv4_tiny', learner 'medmeta_conv4'.*shape mismatches"):
        load_learner(path, MAML(create_backbone("medmeta_conv4")))
    with pytest.raises(ValueError, match=r"learner: checkpoint 'MAML', learner 'ProtoNet'"):
        load_learner(path, ProtoNet(create_backbone("medmeta_conv4_tiny")))
    with pytest.raises(ValueError, match=r"missing keys \['inner_lrs"):
        load_learner(path, MetaSGD(create_backbone("medmeta_conv4_tiny")))
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a medmeta checkpoint"):
        load_learner(tmp_path / "plain.pt", MAML(create_backbone("medmeta_conv4_tiny")))


@pytest.mark.parametrize("name", ["protonet", "linear_probe", "finetune", "maml", "anil", "protomaml"])
def test_bad_input_gets_errors_that_say_what_differs(name: str) -> None:
    learner = create_learner(name, create_backbone("medmeta_conv4_tiny"), **({"steps": 1} if name == "finetune" else {}))
    ep = random_episode("MULTICLASS_CLASSIFICATION", 3, shots=2, size=16, seed=0)
    keep = ep.support_labels != 2
    with pytest.raises(ValueError, match=r"no examples of class 'c2'"):
        learner.adapt(ep.support_images[keep], ep.support_labels[keep], ep.description)
    bad = ep.support_labels.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2 \(min 0, max 7\)"):
        learner.adapt(ep.support_images, bad, ep.description)
    predictor = learner.adapt(ep.support_images, ep.support_labels, ep.description)
    with pytest.raises(ValueError, match="1 channels, but the support set has 3"):
        predictor(ep.query_images[:, :1])
    binary = random_episode("BINARY_CLASSIFICATION", 2, shots=2, size=16, seed=0)
    pos = binary.support_labels[:, 0] == 1
    with pytest.raises(ValueError, match="negative class 'c0'"):
        learner.adapt(binary.support_images[pos], binary.support_labels[pos], binary.description)
    with pytest.raises(ValueError, match=r"expects labels of shape \(N, 1\)"):
        learner.adapt(binary.support_images, binary.support_labels[:, 0].long(), binary.description)
    ml = random_episode("MULTILABEL_CLASSIFICATION", 2, shots=2, size=16, seed=0)
    labels = ml.support_labels.clone()
    labels[:, 1] = 1.0
    with pytest.raises(ValueError, match="negatives of label 'c1'"):
        learner.adapt(ml.support_images, labels, ml.description)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\)"):
        learner.adapt(ep.support_images[:, 0], ep.support_labels, ep.description)


def test_a_seed_fixes_meta_training_and_fine_tuning_on_cpu() -> None:
    from medmeta.episodes.samplers import FewShotSampler

    source = pattern_source("MULTICLASS_CLASSIFICATION", 4, per_class=8, size=16, seed=0)

    def run() -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(123)
        learner = MAML(create_backbone("medmeta_conv4_tiny"), inner_steps=1, eval_inner_steps=2)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
        sampler = FewShotSampler(source, n_way=3, n_shot=2, n_query=2, seed=5)
        for step in range(3):
            eps = [sampler.sample(2 * step + i).materialize(source) for i in range(2)]
            opt.zero_grad()
            learner.meta_loss(eps).backward()
            opt.step()
        ft = FineTune(learner.backbone, steps=3, batch_size=3, augment="medimeta")
        return [p.detach().clone() for p in learner.state_dict().values()], ft.predict(eps[0])

    a, la = run()
    b, lb = run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(la, lb)
