"""Frozen episode lists: JSON round trip, replay, verification against the data."""
from __future__ import annotations

import json

import numpy as np
import pytest
from episode_fixtures import make_source

from medmeta.episodes import (
    FewShotSampler,
    VariableFewShotSampler,
    load_episode_list,
    read_episode_list,
    save_episode_list,
    source_facts,
)


def _specs():
    mc = make_source(counts=(20, 20, 20), dataset_id="a", task_name="multi class")
    ml = make_source("MULTILABEL_CLASSIFICATION", n_items=200, dataset_id="b", task_name="labels")
    bi = make_source("BINARY_CLASSIFICATION", counts=(30, 30), dataset_id="c", task_name="bin")
    specs = (
        FewShotSampler(mc, n_way=2, n_shot=3, n_query=4, seed=9).specs(5)
        + VariableFewShotSampler(ml, shot_range=(1, 3), n_query=2, seed=9).specs(5)
        + FewShotSampler(bi, n_shot=2, n_query=3, seed=9).specs(5)
    )
    return {(s.description.dataset_id, s.description.task_name): s for s in (mc, ml, bi)}, specs


def test_frozen_list_replays_identically(tmp_path):
    sources, specs = _specs()
    path = save_episode_list(tmp_path / "eval.json", specs, seed=9, dataset_facts=list(sources.values()),
                             protocol={"shots": [3], "n_query": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind
    payload = json.loads(path.read_text())  # plain JSON, no pickle
    assert payload["seed"] == 9 and len(payload["datasets"]) == 3
    assert payload["datasets"][0]["num_items"] == 60 and len(payload["datasets"][0]["labels_sha256"]) == 64
    loaded = load_episode_list(path, sources, protocol={"shots": [3], "n_query": 4})
    assert len(loaded) == len(specs)
    for a, b in zip(specs, loaded):
        assert a.same_as(b) and a.seed == b.seed and a.instance == b.instance and a.split == b.split
        src = sources[(a.dataset_id, a.task_name)]
        ea, eb = a.materialize(src), b.materialize(src)
        assert bool((ea.support_images == eb.support_images).all())
        assert bool((ea.query_labels == eb.query_labels).all())
        assert ea.support_labels.dtype == eb.support_labels.dtype


def test_frozen_list_rejects_other_data_and_settings(tmp_path):
    sources, specs = _specs()
    path = save_episode_list(tmp_path / "eval.json", specs, seed=9, dataset_facts=list(sources.values()),
                             protocol={"shots": [3]})
    # another version of a dataset: one label changed
    changed = dict(sources)
    changed[("a", "multi class")] = make_source(counts=(20, 20, 20), dataset_id="a", task_name="multi class")
    changed[("a", "multi class")].labels[0] = (changed[("a", "multi class")].labels[0] + 1) % 3
    with pytest.raises(ValueError, match=r"eval.json.*'a' task 'multi class'.*labels_sha256"):
        load_episode_list(path, changed)
    # another split: same task, other items
    other_split = dict(sources)
    other_split[("b", "labels")] = make_source("MULTILABEL_CLASSIFICATION", n_items=150, dataset_id="b", task_name="labels")
    with pytest.raises(ValueError, match="num_items is 150 here but 200"):
        load_episode_list(path, other_split)
    with pytest.raises(ValueError, match="other protocol settings.*shots"):
        load_episode_list(path, sources, protocol={"shots": [5]})
    with pytest.raises(ValueError, match="not available"):
        load_episode_list(path, {k: v for k, v in sources.items() if k[0] != "c"})
    # a tampered episode (labels no longer those of the data)
    payload = json.loads(path.read_text())
    payload["episodes"][0]["support_labels"][0] = 1 - payload["episodes"][0]["support_labels"][0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="bad.json: episode a/multi class#0 has support labels"):
        load_episode_list(bad, sources)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json: not valid JSON"):
        read_episode_list(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="no dataset facts"):
        save_episode_list(tmp_path / "x.json", specs, seed=9, dataset_facts=[sources[("a", "multi class")]])


def test_source_facts_hash_tracks_labels():
    a = make_source(counts=(10, 10))
    b = make_source(counts=(10, 10))
    assert source_facts(a) == source_facts(b)
    b.labels = np.roll(b.labels, 1)
    assert source_facts(a)["labels_sha256"] != source_facts(b)["labels_sha256"]
