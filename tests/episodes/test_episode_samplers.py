"""Samplers: episode composition per task kind, determinism, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.episodes import EpisodeSpec, FewShotSampler, InsufficientDataError, VariableFewShotSampler
from medmeta.tasks import TaskTarget

REPO = Path(__file__).resolve().parents[2]


def _disjoint(spec: EpisodeSpec) -> None:
    assert len(np.intersect1d(spec.support_positions, spec.query_positions)) == 0
    assert len(np.intersect1d(spec.support_indices, spec.query_indices)) == 0
    assert len(np.unique(spec.support_positions)) == len(spec.support_positions)
    assert len(np.unique(spec.query_positions)) == len(spec.query_positions)


def test_multiclass_every_class_has_exactly_k_support_and_q_query(source_factory):
    src = source_factory(counts=(30, 25, 40, 18, 22))
    sampler = FewShotSampler(src, n_way=3, n_shot=4, n_query=6, seed=3)
    seen_classes = set()
    for k in range(20):
        spec = sampler.sample(k)
        _disjoint(spec)
        assert spec.n_way == 3 and spec.shots == 4 and spec.instance == k
        assert np.bincount(spec.support_labels, minlength=3).tolist() == [4, 4, 4]
        assert np.bincount(spec.query_labels, minlength=3).tolist() == [6, 6, 6]
        # labels are episode positions of the kept classes, indices are the original ones
        raw = src.labels[spec.support_positions]
        assert [spec.description.label_keys[y] for y in spec.support_labels] == raw.tolist()
        np.testing.assert_array_equal(spec.support_indices, spec.support_positions + 1000)
        assert list(spec.description.label_keys) == sorted(spec.description.label_keys)
        seen_classes.update(spec.description.label_keys)
    assert seen_classes == {0, 1, 2, 3, 4}  # random 3-of-5 subsets cover every class


def test_all_classes_by_default_and_materialize_reads_once(source_factory):
    src = source_factory(counts=(15, 15, 15, 15))
    calls = []
    original = src.read_images

    def counting(positions):
        calls.append(np.asarray(positions).copy())
        return original(positions)

    src.read_images = counting
    spec = FewShotSampler(src, n_shot=2, n_query=3).sample(0)
    episode = spec.materialize(src)
    assert len(calls) == 1 and len(calls[0]) == 4 * 2 + 4 * 3
    assert episode.n_way == 4
    assert episode.support_labels.dtype == torch.int64 and episode.support_labels.shape == (8,)
    # image i is filled with i: the images are those of the recorded positions
    assert episode.support_images[:, 0, 0, 0].long().tolist() == spec.support_positions.tolist()
    assert episode.query_images[:, 0, 0, 0].long().tolist() == spec.query_positions.tolist()
    assert episode.info["shots"] == 2 and episode.info["dataset_id"] == "toy"


def test_binary_k_positives_k_negatives_one_output(source_factory):
    src = source_factory("BINARY_CLASSIFICATION", counts=(40, 20))
    sampler = FewShotSampler(src, n_shot=5, n_query=7)
    spec = sampler.sample(0)
    _disjoint(spec)
    assert spec.support_labels.shape == (10, 1) and spec.query_labels.shape == (14, 1)
    assert spec.support_labels.sum() == 5 and spec.query_labels.sum() == 7
    assert spec.description.num_outputs == 1 and spec.description.classes == ("class0", "class1")
    raw = src.labels[spec.support_positions]
    np.testing.assert_array_equal(raw == 1, spec.support_labels[:, 0] == 1)
    episode = spec.materialize(src)
    assert episode.support_labels.dtype == torch.float32 and episode.support_labels.shape == (10, 1)
    with pytest.raises(ValueError, match="binary task has 2 classes"):
        FewShotSampler(src, n_way=3)


def _covers(labels: np.ndarray, k: int) -> bool:
    return bool(np.all(labels.sum(0) >= k) and np.all((1 - labels).sum(0) >= k))


def test_multilabel_covers_every_label_and_is_minimal(source_factory):
    src = source_factory("MULTILABEL_CLASSIFICATION", n_items=300, n_labels=4, p_positive=0.3)
    sampler = FewShotSampler(src, n_shot=3, n_query=5, seed=1)
    sizes = set()
    for k in range(15):
        spec = sampler.sample(k)
        _disjoint(spec)
        assert spec.support_labels.shape[1] == 4
        np.testing.assert_array_equal(spec.support_labels, src.labels[spec.support_positions].astype(np.float32))
        for labels, kk in ((spec.support_labels, 3), (spec.query_labels, 5)):
            assert _covers(labels, kk)
            # pruned: no image can be removed without losing the cover
            for i in range(len(labels)):
                assert not _covers(np.delete(labels, i, axis=0), kk)
        sizes.add(len(spec.support_positions))
    assert len(sizes) > 1  # support size varies
    assert all(6 <= s <= 2 * 3 * 4 for s in sizes)


def test_multilabel_label_subset(source_factory):
    src = source_factory("MULTILABEL_CLASSIFICATION", n_items=300, n_labels=5, p_positive=0.3)
    spec = FewShotSampler(src, n_way=2, n_shot=2, n_query=2, seed=4).sample(7)
    cols = list(spec.description.label_keys)
    assert len(cols) == 2 and cols == sorted(cols)
    np.testing.assert_array_equal(spec.support_labels, src.labels[spec.support_positions][:, cols])
    assert _covers(spec.support_labels, 2)


def test_ordinal_keys_with_gaps_map_in_order(source_factory):
    # description lists keys out of order; episodes must map them in key order
    src = source_factory("ORDINAL_REGRESSION", counts=(12, 12, 12, 12, 12), keys=(10, 1, 6, 4, 8))
    spec = FewShotSampler(src, n_shot=2, n_query=2).sample(0)
    assert spec.description.label_keys == (1, 4, 6, 8, 10)
    raw = src.labels[spec.support_positions]
    expected = np.searchsorted(np.array([1, 4, 6, 8, 10]), raw)
    np.testing.assert_array_equal(spec.support_labels, expected)
    sub = FewShotSampler(src, n_way=3, n_shot=1, n_query=1, seed=2)
    for k in range(10):
        s = sub.sample(k)
        keys = list(s.description.label_keys)
        assert keys == sorted(keys)
        raw = src.labels[s.query_positions]
        assert [keys[y] for y in s.query_labels] == raw.tolist()


def test_same_seed_same_episodes_resumable_and_seed_matters(source_factory):
    src = source_factory(counts=(30, 30, 30, 30))
    a = FewShotSampler(src, n_way=2, n_shot=3, n_query=4, seed=11)
    b = FewShotSampler(src, n_way=2, n_shot=3, n_query=4, seed=11)
    c = FewShotSampler(src, n_way=2, n_shot=3, n_query=4, seed=12)
    later = b.sample(9)  # episode 9 first: it does not depend on episodes 0..8
    specs = a.specs(10)
    assert specs[9].same_as(later)
    assert all(s.same_as(t) for s, t in zip(specs, b.specs(10)))
    assert not all(s.same_as(t) for s, t in zip(specs, c.specs(10)))


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from episode_fixtures import make_source
    from medmeta.episodes import FewShotSampler, VariableFewShotSampler
    out = []
    for target, kw in [("MULTICLASS_CLASSIFICATION", {{}}), ("MULTILABEL_CLASSIFICATION", {{"n_items": 300}})]:
        src = make_source(target, **kw)
        for s in [FewShotSampler(src, n_shot=3, n_query=2, seed=5), VariableFewShotSampler(src, shot_range=(1, 4), n_query=2, seed=5)]:
            out += [sp.to_dict() for sp in s.specs(4, start=10)]
    print(json.dumps(out))
    """
)


def test_same_seed_same_episodes_in_another_process():
    from episode_fixtures import make_source  # the same module the subprocess imports

    script = _SCRIPT.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    theirs = [EpisodeSpec.from_dict(d) for d in json.loads(result.stdout)]
    ours = []
    for target, kw in [("MULTICLASS_CLASSIFICATION", {}), ("MULTILABEL_CLASSIFICATION", {"n_items": 300})]:
        src = make_source(target, **kw)
        for s in [FewShotSampler(src, n_shot=3, n_query=2, seed=5), VariableFewShotSampler(src, shot_range=(1, 4), n_query=2, seed=5)]:
            ours += s.specs(4, start=10)
    assert len(theirs) == len(ours) == 16
    assert all(a.same_as(b) for a, b in zip(ours, theirs))


def test_variable_way_and_shot(source_factory):
    src = source_factory(counts=(20, 20, 20, 20, 20, 20))
    sampler = VariableFewShotSampler(src, way_range=(2, None), shot_range=(1, 5), n_query=3, seed=0)
    ways, shots = set(), set()
    for k in range(60):
        spec = sampler.sample(k)
        _disjoint(spec)
        assert 2 <= spec.n_way <= 6 and 1 <= spec.shots <= 5
        assert np.bincount(spec.support_labels).tolist() == [spec.shots] * spec.n_way
        assert np.bincount(spec.query_labels).tolist() == [3] * spec.n_way
        ways.add(spec.n_way)
        shots.add(spec.shots)
    assert ways == {2, 3, 4, 5, 6} and shots == {1, 2, 3, 4, 5}
    binary = VariableFewShotSampler(source_factory("BINARY_CLASSIFICATION", counts=(30, 30)), shot_range=(2, 3))
    spec = binary.sample(0)
    assert spec.support_labels.shape[1] == 1 and spec.support_labels.sum() == spec.shots


def test_insufficient_class_error_names_task_class_and_counts(source_factory):
    src = source_factory(counts=(30, 7, 30), dataset_id="derm", task_name="lesion type")
    with pytest.raises(InsufficientDataError) as info:
        FewShotSampler(src, n_shot=5, n_query=10)
    msg = str(info.value)
    assert "'derm'/'lesion type'" in msg and "'class1'" in msg and "7 images" in msg and "15" in msg
    binary = source_factory("BINARY_CLASSIFICATION", counts=(40, 6))
    with pytest.raises(InsufficientDataError, match=r"6 positives, 40 negatives"):
        FewShotSampler(binary, n_shot=5, n_query=5)


def test_insufficient_class_skip_is_counted_and_reported(source_factory):
    src = source_factory(counts=(30, 7, 30, 3))
    with pytest.warns(UserWarning, match="2 class"):
        sampler = FewShotSampler(src, n_shot=5, n_query=10, on_insufficient="skip")
    assert [s["class"] for s in sampler.skipped] == ["class1", "class3"]
    assert [s["positives"] for s in sampler.skipped] == [7, 3]
    for k in range(5):
        assert set(sampler.sample(k).description.label_keys) == {0, 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InsufficientDataError, match="only 1 of 4"):
            FewShotSampler(source_factory(counts=(30, 7, 3, 3)), n_shot=5, n_query=10, on_insufficient="skip")


def test_bad_arguments_give_clear_errors(source_factory):
    src = source_factory(counts=(30, 30, 30))
    with pytest.raises(ValueError, match="n_way=4 but task .* has only 3 classes"):
        FewShotSampler(src, n_way=4)
    with pytest.raises(ValueError, match="n_shot: expected an integer >= 1"):
        FewShotSampler(src, n_shot=0)
    with pytest.raises(ValueError, match="n_query"):
        FewShotSampler(src, n_query=0)
    with pytest.raises(ValueError, match="on_insufficient"):
        FewShotSampler(src, on_insufficient="ignore")
    with pytest.raises(ValueError, match="shot_range"):
        VariableFewShotSampler(src, shot_range=(0, 3))
    with pytest.raises(ValueError, match="way_range"):
        VariableFewShotSampler(src, way_range=(4, None))
    with pytest.raises(ValueError, match="seed and episode number"):
        FewShotSampler(src).sample(-1)
    regression = source_factory(counts=(30, 30))
    object.__setattr__(regression.description, "task_target", TaskTarget.REGRESSION)
    with pytest.raises(ValueError, match="classification target"):
        FewShotSampler(regression)


def test_materialize_refuses_another_source(source_factory):
    src = source_factory(counts=(20, 20))
    spec = FewShotSampler(src, n_shot=2, n_query=2).sample(0)
    other = source_factory(counts=(20, 20), image_offset=5000)
    with pytest.raises(ValueError, match="another split or version"):
        spec.materialize(other)
