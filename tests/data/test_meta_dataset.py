"""MetaDataset over the 19 real info.yaml files, the hand-written root and the synthetic data;
the synthetic generator (determinism, task kinds, learnability) and the embedded-data cache."""
from __future__ import annotations

import multiprocessing
import shutil
from collections import Counter

import h5py
import numpy as np
import pytest

from medmeta.data import MetaDataset, TaskEntry, UnknownNameError
from medmeta.data.catalog import CATALOG_DIR as REAL_INFOS  # the 19 real info.yaml files, shipped
from medmeta.recipes import embedded
from medmeta.recipes.synthetic import SYNTHETIC_DATASETS, build_synthetic_meta_dataset
from medmeta.tasks import TaskTarget


@pytest.fixture(scope="module")
def real_info_root(tmp_path_factory):
    """The 19 real MedIMeta v1.0 info.yaml files, each in a folder named by its id (no images)."""
    if not REAL_INFOS.is_dir():
        pytest.fail(f"{REAL_INFOS}: the reference info.yaml files are missing")
    import yaml

    root = tmp_path_factory.mktemp("real_infos")
    for path in sorted(REAL_INFOS.glob("*.yaml")):
        dataset_id = yaml.safe_load(path.read_text())["id"]
        (root / dataset_id).mkdir()
        shutil.copy(path, root / dataset_id / "info.yaml")
    return root


def test_the_real_infos_parse_with_their_published_counts(real_info_root):
    meta = MetaDataset(real_info_root)
    assert len(meta.datasets) == 19
    assert len(meta.domains) == 10
    targets = Counter(t.task_target.value for info in meta.datasets.values() for t in info.tasks)
    assert targets == {"MULTICLASS_CLASSIFICATION": 30, "BINARY_CLASSIFICATION": 13, "MULTILABEL_CLASSIFICATION": 6,
                       "ORDINAL_REGRESSION": 5}
    cxr = meta.datasets["cxr"]
    assert cxr.total_num_samples == 112_120 and cxr.original_splits_num_samples["val"] == 0
    assert cxr.input_size == (1, 224, 224)
    artifact = meta.datasets["dr_regular"].task("Artifact")
    assert artifact.label_keys == (0, 1, 4, 6, 8, 10)
    assert artifact.description(meta.datasets["dr_regular"]).task_identifier == \
        "Diabetic Retinopathy (Regular Fundus): Artifact"


def test_held_out_drops_the_target_and_its_domain_and_subject_overlaps(real_info_root):
    meta = MetaDataset(real_info_root)
    kept = meta.held_out("dr_regular")
    assert set(meta.datasets) - set(kept.datasets) == {"dr_regular", "dr_uwf", "fundus", "glaucoma"}
    kept = meta.held_out("organs_axial")
    assert set(meta.datasets) - set(kept.datasets) == {"organs_axial", "organs_coronal", "organs_sagittal"}
    kept = meta.held_out("skinl_derm")  # domain overlap derm, subject overlap skinl_photo
    assert set(meta.datasets) - set(kept.datasets) == {"skinl_derm", "derm", "skinl_photo"}
    assert set(kept.left_out) == {"skinl_derm", "derm", "skinl_photo"}
    assert set(meta.held_out("crc").datasets) == set(meta.datasets) - {"crc"}
    with pytest.raises(UnknownNameError, match=r"'skinl_clinic'.*did you mean"):
        meta.held_out("skinl_clinic")  # the id renamed after the paper (now skinl_photo)


def test_tasks_entries_filters_and_summary_on_hand_data(hand_root):
    meta = MetaDataset(hand_root)
    assert sorted(meta.datasets) == ["hand_gray", "hand_gray_as_rgb", "hand_rgb", "hand_rgb_as_gray"]
    entry = meta.task("hand_rgb", "Field definition")
    assert isinstance(entry, TaskEntry)
    assert (entry.domain, entry.target, entry.num_classes, entry.num_samples) == ("Domain A", "ORDINAL_REGRESSION", 5, 12)
    assert entry.class_counts == {1: 3, 4: 3, 6: 2, 8: 2, 10: 2}  # computed from the label file (no class_counts key)
    assert meta.task("hand_rgb", "findings").class_counts == {0: 6, 1: 6, 2: 4}
    assert entry.description.label_keys == (1, 4, 6, 8, 10)
    assert len(meta.tasks) == 7 and len(meta) == 7 and ("hand_rgb", "organ") in meta
    assert [e.dataset_id for e in meta.filter(domains="Domain B").tasks] == ["hand_gray", "hand_gray_as_rgb"]
    binary = meta.filter(targets=[TaskTarget.BINARY_CLASSIFICATION])
    assert {(e.dataset_id, e.task_name) for e in binary.tasks} == {("hand_rgb", "malignant"), ("hand_gray_as_rgb", "grade")}
    both = meta.filter(dataset_ids=["hand_rgb", "hand_gray"], targets="MULTICLASS_CLASSIFICATION")
    assert [(e.dataset_id, e.task_name) for e in both.tasks] == [("hand_gray", "grade"), ("hand_rgb", "organ")]
    held = meta.held_out("hand_rgb")  # overlaps: hand_gray, hand_gray_as_rgb and a missing id
    assert list(held.datasets) == ["hand_rgb_as_gray"]
    table = meta.summary()
    row = table[(table.dataset_id == "hand_rgb") & (table.task_name == "organ")].iloc[0]
    assert (row.train, row.val, row.test, row.input_size, row.min_class_count) == (8, 2, 2, "3x6x5", 4)
    assert len(table) == 7
    assert MetaDataset(hand_root / "hand_gray").dataset_ids == ["hand_gray"]  # a single dataset folder
    assert MetaDataset(hand_root, dataset_ids=["hand_gray"]).dataset_ids == ["hand_gray"]
    src = meta.source("hand_gray", "grade", split="val")
    assert meta.source("hand_gray", "grade", split="val") is src  # cached per process
    assert meta.source("hand_gray", "grade", split="val", transform=lambda x: x) is not src


def test_synthetic_meta_dataset_kinds_and_formats(synthetic_root):
    meta = MetaDataset(synthetic_root)
    assert sorted(meta.datasets) == sorted(d.id for d in SYNTHETIC_DATASETS)
    assert len(meta.domains) == 5
    assert {e.target for e in meta.tasks} == {t.value for t in (
        TaskTarget.MULTICLASS_CLASSIFICATION, TaskTarget.BINARY_CLASSIFICATION,
        TaskTarget.MULTILABEL_CLASSIFICATION, TaskTarget.ORDINAL_REGRESSION)}
    assert {info.num_channels for info in meta.datasets.values()} == {1, 3}
    grade = meta.task("syn_fundus", "retinopathy grade")
    assert grade.description.label_keys == (0, 2, 5, 9) and sum(grade.class_counts.values()) == 60
    with h5py.File(synthetic_root / "syn_xray" / "images.hdf5") as f:
        assert f["images"].shape == (60, 16, 16) and f["images"].dtype == np.uint8
    with h5py.File(synthetic_root / "syn_path" / "images.hdf5") as f:
        assert f["images"].shape == (60, 16, 16, 3)
    assert set(meta.held_out("syn_derm").datasets) == set(meta.datasets) - {"syn_derm", "syn_derm_clinic"}
    for e in meta.tasks:  # every class of every task appears in every split
        for split in ("train", "val", "test"):
            labels = meta.source(e.dataset_id, e.task_name, split=split).labels
            if e.target == "MULTILABEL_CLASSIFICATION":
                assert (labels.sum(0) > 0).all(), (e, split)
            else:
                assert set(np.unique(labels)) == set(e.description.label_keys), (e, split)


def test_synthetic_is_seeded(tmp_path, synthetic_root):
    again = build_synthetic_meta_dataset(tmp_path / "a", seed=0, image_size=16, num_images=60, dataset_ids=["syn_oct"])
    other = build_synthetic_meta_dataset(tmp_path / "b", seed=1, image_size=16, num_images=60, dataset_ids=["syn_oct"])
    with h5py.File(synthetic_root / "syn_oct" / "images.hdf5") as f, h5py.File(again / "syn_oct" / "images.hdf5") as g, \
            h5py.File(other / "syn_oct" / "images.hdf5") as h:
        assert np.array_equal(f["images"][:], g["images"][:])
        assert not np.array_equal(f["images"][:], h["images"][:])
    for name in ("condition", "severity"):
        assert np.array_equal(np.load(synthetic_root / "syn_oct" / "task_labels" / f"{name}.npy"),
                              np.load(again / "syn_oct" / "task_labels" / f"{name}.npy"))
    with pytest.raises(ValueError, match=r"dataset_ids: unknown synthetic datasets \['nope'\]"):
        build_synthetic_meta_dataset(tmp_path / "c", dataset_ids=["nope"])


def test_synthetic_classes_are_learnable_above_chance(tmp_path):
    """A nearest-centroid classifier on raw pixels, 5 shots per class, beats chance on every
    single-label task by a clear margin (averaged over 20 episodes); multi-label columns by a
    per-column logistic threshold on the centroid difference."""
    root = build_synthetic_meta_dataset(tmp_path, seed=3, image_size=16, num_images=120)
    meta = MetaDataset(root)
    rng = np.random.default_rng(0)
    for e in meta.tasks:
        src = meta.source(e.dataset_id, e.task_name, split=None)
        x = src.read_images(range(len(src))).flatten(1).numpy()
        y = src.labels
        if e.target == "MULTILABEL_CLASSIFICATION":
            for k in range(e.num_classes):
                accs = []
                for _ in range(20):
                    sup = np.concatenate([rng.choice(np.flatnonzero(y[:, k] == v), 5, replace=False) for v in (0, 1)])
                    q = np.setdiff1d(np.arange(len(y)), sup)
                    c = np.stack([x[sup][y[sup, k] == v].mean(0) for v in (0, 1)])
                    pred = ((x[q, None] - c[None]) ** 2).sum(-1).argmin(1)
                    accs.append((pred == y[q, k]).mean())
                assert np.mean(accs) > 0.6, (e.task_name, k, np.mean(accs))
            continue
        keys = np.asarray(e.description.label_keys)
        accs = []
        for _ in range(20):
            sup = np.concatenate([rng.choice(np.flatnonzero(y == k), 5, replace=False) for k in keys])
            q = np.setdiff1d(np.arange(len(y)), sup)
            c = np.stack([x[sup][y[sup] == k].mean(0) for k in keys])
            accs.append((keys[((x[q, None] - c[None]) ** 2).sum(-1).argmin(1)] == y[q]).mean())
        chance = 1 / len(keys)
        assert np.mean(accs) > chance + 0.15, (e.dataset_id, e.task_name, np.mean(accs), chance)


def _open_in_child(_):
    return str(embedded.open_default("synthetic").root)


def test_embedded_synthetic_builds_once_into_a_versioned_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMETA_DATA_DIR", str(tmp_path / "cache"))
    path = embedded.embedded_path("synthetic")
    assert path == tmp_path / "cache" / f"synthetic-v{embedded.SYNTHETIC_VERSION}" and not path.exists()
    with multiprocessing.get_context("fork").Pool(2) as pool:  # two processes race to build it
        roots = pool.map(_open_in_child, [0, 1])
    assert roots == [str(path), str(path)]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary folder left
    marker = path / "syn_oct" / "info.yaml"
    stamp = marker.stat().st_mtime_ns
    meta = embedded.open_default("synthetic")
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert len(meta.datasets) == len(SYNTHETIC_DATASETS)
    with pytest.raises(UnknownNameError, match=r"embedded data set 'rael' does not exist; did you mean 'real'"):
        embedded.open_default("rael")


def test_embedded_synthetic_bytes_are_those_of_the_cached_version(tmp_path):
    """The embedded cache folder is named after SYNTHETIC_VERSION: if this fails, the recipe writes
    other bytes than before, so bump SYNTHETIC_VERSION and record the new digest."""
    import hashlib

    assert embedded.SYNTHETIC_VERSION == 2
    folder = build_synthetic_meta_dataset(tmp_path, seed=0, image_size=32, num_images=600, dataset_ids=["syn_oct"])
    folder = folder / "syn_oct"
    h = hashlib.sha256()
    with h5py.File(folder / "images.hdf5", "r") as f:
        h.update(np.ascontiguousarray(f["images"][()]).tobytes())
    for p in sorted((folder / "task_labels").glob("*.npy")) + sorted((folder / "splits").glob("*.txt")):
        h.update(p.name.encode())
        h.update(np.load(p).tobytes() if p.suffix == ".npy" else p.read_bytes())
    assert h.hexdigest() == "66fa1df8e7bf8ca242879a85a2d913b75e85df1410212ba04cd63acd59c0175e"


def test_embedded_real_uses_the_real_mini_builder(tmp_path, monkeypatch):
    """The "real" entry calls its builder once and opens what it wrote (builder stubbed here; the
    real-mini builder has its own tests)."""
    monkeypatch.setenv("MEDMETA_DATA_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_builder(root):
        calls.append(root)
        return build_synthetic_meta_dataset(root, image_size=8, num_images=20, dataset_ids=["syn_path"])

    monkeypatch.setitem(embedded.EMBEDDED, "real", (lambda: "test", fake_builder))
    meta = embedded.open_default("real")
    assert meta.dataset_ids == ["syn_path"] and meta.root == tmp_path / "cache" / "real-vtest"
    embedded.open_default()
    assert len(calls) == 1
