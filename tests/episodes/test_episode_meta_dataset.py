"""Samplers, streams and protocols on a real MedIMeta-format meta-dataset (the synthetic one, tiny)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from medmeta.data import MetaDataset
from medmeta.episodes import EpisodeStream, MultiDomainSampler
from medmeta.evaluation.protocols import custom_protocol, run_protocol
from medmeta.recipes import build_synthetic_meta_dataset
from medmeta.tasks import TaskTarget


@pytest.fixture(scope="module")
def meta_root(tmp_path_factory):
    return build_synthetic_meta_dataset(tmp_path_factory.mktemp("synthetic"), seed=0, image_size=16, num_images=120)


def _check_episode(episode, meta: MetaDataset, split: str) -> None:
    info = episode.info
    source = meta.source(info["dataset_id"], info["task_name"], split=split)
    split_indices = set(np.asarray(source.image_indices).tolist())
    s_idx, q_idx = set(episode.support_indices.tolist()), set(episode.query_indices.tolist())
    assert not s_idx & q_idx and s_idx | q_idx <= split_indices
    assert episode.support_images.shape[1:] == (3, 16, 16) and episode.query_images.dtype == torch.float32
    target, shots = episode.description.task_target, info["shots"]
    if target in (TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION):
        assert torch.bincount(episode.support_labels, minlength=episode.n_way).tolist() == [shots] * episode.n_way
        assert torch.bincount(episode.query_labels, minlength=episode.n_way).tolist() == [info["n_query"]] * episode.n_way
    elif target is TaskTarget.BINARY_CLASSIFICATION:
        assert episode.support_labels.shape == (2 * shots, 1) and episode.support_labels.sum() == shots
    else:
        pos = episode.support_labels.sum(0)
        assert bool((pos >= shots).all()) and bool(((len(episode.support_labels) - pos) >= shots).all())
    # the images are those of the recorded indices, read through the dataset's own source
    positions = source.positions_of(episode.support_indices)
    torch.testing.assert_close(episode.support_images, source.read_images(positions))


def test_multi_domain_stream_over_a_meta_dataset(meta_root):
    meta = MetaDataset(meta_root, channels=3)
    sampler = MultiDomainSampler(meta, split="train", way_range=(2, None), shot_range=(1, 3), n_query=2, seed=0)
    assert sorted(sampler.tasks) == sorted(e.key for e in meta.tasks)  # every task is a classification task
    stream = EpisodeStream(sampler, sources=meta, stop=12, batch_size=3)
    seen = []
    for batch in stream.loader(num_workers=0):
        for episode in batch:
            _check_episode(episode, meta, "train")
            seen.append(episode)
    assert len(seen) == 12 and stream.state_dict()["next_episode"] == 12
    assert len({(e.info["dataset_id"], e.info["task_name"]) for e in seen}) >= 4
    # the same episode number gives the same images in a fresh meta-dataset object
    again = MultiDomainSampler(MetaDataset(meta_root, channels=3), split="train", way_range=(2, None),
                               shot_range=(1, 3), n_query=2, seed=0)
    assert again.sample(7).same_as(sampler.sample(7))
    # validation episodes come from the val split only
    val = MultiDomainSampler(meta, split="val", n_shot=1, n_query=1, seed=0)
    for spec in val.specs(5):
        train = set(np.asarray(meta.source(spec.dataset_id, spec.task_name, split="train").image_indices).tolist())
        assert not set(spec.support_indices.tolist()) & train


def test_protocol_on_a_meta_dataset_and_an_episode_list_of_other_data(meta_root, tmp_path):
    from medmeta.backbones import create_backbone
    from medmeta.learners import ProtoNet

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = ProtoNet(create_backbone("medmeta_conv4_tiny"))
    meta = MetaDataset(meta_root, channels=3)
    tasks = [("syn_oct", "severity"), ("syn_xray", "findings"), ("syn_derm", "malignant")]
    config = custom_protocol([2], 3, ["accuracy", "auroc"], n_query=2, name="tiny", seed=5)
    df = run_protocol({"protonet": learner}, meta, tasks, config, out_dir=tmp_path / "run", progress=False)
    assert len(df) == 9 and set(zip(df.dataset, df.task)) == set(tasks)
    assert df["auroc"].between(0, 1).all() and (df["split"] == "test").all()
    lists = sorted((tmp_path / "run" / "episodes").glob("tiny__*.json"))
    assert len(lists) == 3
    # the same lists replay on the same data ...
    again = run_protocol({"protonet": learner}, meta, tasks, custom_protocol(
        [2], 3, ["accuracy", "auroc"], n_query=2, name="tiny", seed=5, episode_dir=str(tmp_path / "run" / "episodes")),
        progress=False)
    np.testing.assert_allclose(again["auroc"].to_numpy(), df["auroc"].to_numpy())
    # ... and are refused on another version of the dataset (same names, other images and labels)
    other = build_synthetic_meta_dataset(tmp_path / "other", seed=1, image_size=16, num_images=120)
    with pytest.raises(ValueError, match=r"does not match the list: labels_sha256"):
        run_protocol({"protonet": learner}, MetaDataset(other, channels=3), tasks, custom_protocol(
            [2], 3, ["accuracy", "auroc"], n_query=2, name="tiny", seed=5,
            episode_dir=str(tmp_path / "run" / "episodes")), progress=False)
