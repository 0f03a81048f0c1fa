"""Multi-domain sampling and streaming episodes to DataLoader workers."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from episode_fixtures import make_source

from medmeta.episodes import (
    EpisodeStream,
    FewShotSampler,
    InsufficientDataError,
    MultiDomainSampler,
    task_weights,
)


def _sources():
    return {
        ("derm", "type"): make_source(counts=(30, 30, 30, 30), dataset_id="derm", task_name="type", split="train"),
        ("cxr", "finding"): make_source(
            "MULTILABEL_CLASSIFICATION", n_items=200, n_labels=3, dataset_id="cxr", task_name="finding", split="train"
        ),
        ("oct", "normal"): make_source(
            "BINARY_CLASSIFICATION", counts=(300, 100), dataset_id="oct", task_name="normal", split="train"
        ),
    }


def test_task_weights_uniform_size_tempered():
    sizes = [100, 400]
    np.testing.assert_allclose(task_weights(sizes, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(task_weights(sizes, "size"), [0.2, 0.8])
    np.testing.assert_allclose(task_weights(sizes, "tempered", temperature=2.0), [10 / 30, 20 / 30])
    with pytest.raises(ValueError, match="weighting"):
        task_weights(sizes, "random")
    with pytest.raises(ValueError, match="temperature"):
        task_weights(sizes, "tempered", temperature=0)


def test_multi_domain_picks_tasks_by_weight_and_is_deterministic():
    sources = _sources()
    sampler = MultiDomainSampler(sources, weighting="size", n_way=2, n_shot=2, n_query=3, seed=4)
    assert sampler.tasks == list(sources)
    np.testing.assert_allclose(sampler.probabilities, [120 / 720, 200 / 720, 400 / 720])
    specs = sampler.specs(600)
    counts = {t: 0 for t in sampler.tasks}
    for s in specs:
        counts[(s.dataset_id, s.task_name)] += 1
        if s.target.value == "BINARY_CLASSIFICATION":
            assert s.n_way == 2 and s.support_labels.shape == (4, 1)  # binary stays 2-way
        elif s.target.value == "MULTICLASS_CLASSIFICATION":
            assert s.n_way == 2
    freq = np.array([counts[t] for t in sampler.tasks]) / 600
    np.testing.assert_allclose(freq, sampler.probabilities, atol=0.06)
    again = MultiDomainSampler(sources, weighting="size", n_way=2, n_shot=2, n_query=3, seed=4)
    assert again.sample(123).same_as(specs[123])
    # survives pickling (as in a spawned DataLoader worker): samplers are rebuilt lazily
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone.sample(77).same_as(specs[77])


def test_multi_domain_variable_episodes_and_skips():
    sources = _sources()
    sources[("tiny", "t")] = make_source(counts=(4, 4), dataset_id="tiny", task_name="t", split="train")
    with pytest.raises(InsufficientDataError, match="'tiny'/'t'"):
        MultiDomainSampler(sources, shot_range=(1, 3), n_query=2)
    with pytest.warns(UserWarning, match="skipped 1 task"):
        sampler = MultiDomainSampler(sources, shot_range=(1, 3), n_query=2, on_insufficient="skip")
    assert [s["task"] for s in sampler.skipped_tasks] == [("tiny", "t")]
    assert ("tiny", "t") not in sampler.tasks
    shots = {sampler.sample(k).shots for k in range(40)}
    assert shots == {1, 2, 3}
    with pytest.raises(ValueError, match="either n_way/n_shot"):
        MultiDomainSampler(sources, n_shot=2, shot_range=(1, 3))


def _numbers(episodes):
    return [e.info["episode"] for e in episodes]


def _flatten(batches):
    return [e for b in batches for e in b]


def test_stream_workers_give_the_same_episodes_in_order():
    sources = _sources()
    sampler = MultiDomainSampler(sources, n_way=2, n_shot=2, n_query=2, seed=1)
    plain = list(EpisodeStream(sampler, stop=10))
    assert _numbers(plain) == list(range(10))
    stream = EpisodeStream(sampler, stop=10, batch_size=3)
    batches = list(stream.loader(num_workers=2))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    episodes = _flatten(batches)
    assert _numbers(episodes) == list(range(10))
    for a, b in zip(plain, episodes):
        np.testing.assert_array_equal(a.support_indices, b.support_indices)
        assert bool((a.query_images == b.query_images).all())
    assert stream.state_dict()["next_episode"] == 10


def test_stream_shards_by_rank():
    sampler = FewShotSampler(make_source(counts=(30, 30)), n_shot=2, n_query=2)
    ranks = [list(EpisodeStream(sampler, start=5, stop=16, rank=r, world_size=3)) for r in range(3)]
    numbers = [_numbers(r) for r in ranks]
    assert numbers == [[5, 8, 11, 14], [6, 9, 12, 15], [7, 10, 13]]
    assert [len(EpisodeStream(sampler, start=5, stop=16, rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank"):
        EpisodeStream(sampler, rank=2, world_size=2)


def test_stream_resumes_with_exactly_the_episodes_it_would_have_seen():
    sampler = FewShotSampler(make_source(counts=(30, 30, 30)), n_way=2, n_shot=2, n_query=2)
    full = EpisodeStream(sampler, batch_size=2, rank=1, world_size=2)
    reference = []
    for i, batch in enumerate(full.loader()):
        reference.append(batch)
        if i == 4:
            break
    # a run that stops after 2 batches, saves its state and resumes in a new stream
    first = EpisodeStream(sampler, batch_size=2, rank=1, world_size=2)
    seen = []
    for i, batch in enumerate(first.loader()):
        seen.append(batch)
        if i == 1:
            break
    state = first.state_dict()
    assert state["next_episode"] == 8  # 2 batches x 2 episodes x 2 ranks
    resumed = EpisodeStream(sampler, batch_size=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for i, batch in enumerate(resumed.loader(num_workers=2)):
        seen.append(batch)
        if i == 2:
            break
    assert [_numbers(b) for b in seen] == [_numbers(b) for b in reference]
    assert _numbers(_flatten(seen)) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    with pytest.raises(ValueError, match="next_episode"):
        resumed.load_state_dict({})


class _FakeMetaDataset:
    """The meta-dataset interface samplers rely on: ``.tasks`` entries and ``.source(...)``."""

    class Entry:
        def __init__(self, dataset_id, task_name, target):
            self.dataset_id, self.task_name, self.target = dataset_id, task_name, target

    def __init__(self):
        self.sources = _sources()
        self.opened = []
        self.tasks = [self.Entry(d, t, s.description.task_target.value) for (d, t), s in self.sources.items()]
        self.tasks.append(self.Entry("lits", "organ masks", "BINARY_SEGMENTATION"))

    def source(self, dataset_id, task_name, split="train"):
        self.opened.append((dataset_id, task_name, split))
        return self.sources[(dataset_id, task_name)]


def test_multi_domain_over_a_meta_dataset_excludes_other_targets_and_streams_with_transform():
    meta = _FakeMetaDataset()
    sampler = MultiDomainSampler(meta, split="val", n_shot=1, n_query=2, seed=0)
    assert ("lits", "organ masks") not in sampler.tasks and len(sampler.tasks) == 3
    assert sampler.excluded_tasks == [{"task": ("lits", "organ masks"), "reason": "target BINARY_SEGMENTATION"}]
    assert {s for (_, _, s) in meta.opened} == {"val"}
    stream = EpisodeStream(sampler, sources=meta, stop=6, transform=lambda x: -x)
    for episode in stream:
        ref = sampler.sample(episode.info["episode"]).materialize(meta.sources[(episode.info["dataset_id"], episode.info["task_name"])])
        assert bool((episode.support_images == -ref.support_images).all())
