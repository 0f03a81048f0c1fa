"""write_dataset / write_dataset_from_folder: the files they write (checked with the raw libraries
and against hand-written files), derived info fields, validation before writing, atomicity."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import yaml
from data_fixtures import HAND_RGB_LABELS, HAND_RGB_ORIGINAL, HAND_RGB_SPLITS, ORDINAL_KEYS, rgb_pixels
from PIL import Image

from medmeta.data import DataFormatError, DatasetInfo, MedIMetaTaskSource, MetaDataset, MissingDataError, read_info
from medmeta.data import writer as writer_module
from medmeta.data.writer import write_dataset, write_dataset_from_folder

TASKS = [
    {"task_name": "organ", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "liver", 1: "lung", 2: "bone"}},
    {"task_name": "malignant", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "benign", 1: "malignant"}},
    {"task_name": "Field definition", "task_target": "ORDINAL_REGRESSION", "labels": {k: f"level {k}" for k in ORDINAL_KEYS}},
    {"task_name": "findings", "task_target": "MULTILABEL_CLASSIFICATION", "labels": {0: "a", 1: "b", 2: "c"}},
]
INFO = {"id": "hand_rgb", "name": "Hand RGB", "domain": "Domain A", "tasks": TASKS, "summary": "hand-written test data",
        "domain_overlaps": ["hand_gray"], "subject_overlaps": ["hand_gray_as_rgb", "renamed_elsewhere"], "license": "CC0"}


def _write(root, **kw):
    args = dict(info=INFO, images=rgb_pixels(12, 6, 5), task_labels=HAND_RGB_LABELS, splits=HAND_RGB_SPLITS,
                original_splits=HAND_RGB_ORIGINAL)
    args.update(kw)
    return write_dataset(root, **args)


def test_written_files_match_the_hand_written_layout(tmp_path, hand_root):
    folder = _write(tmp_path, write_tiffs=True)
    hand = hand_root / "hand_rgb"
    assert folder == tmp_path / "hand_rgb"
    with h5py.File(folder / "images.hdf5") as f, h5py.File(hand / "images.hdf5") as g:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (12, 6, 5, 3)
        assert f["images"].chunks is None and f["images"].compression is None  # as the official files
        np.testing.assert_array_equal(f["images"][:], g["images"][:])
    for name in ("train", "val", "test"):  # byte-identical split files (sorted, no trailing newline)
        assert (folder / "splits" / f"{name}.txt").read_text() == "\n".join(
            f"images/{i:06d}.tiff" for i in sorted(HAND_RGB_SPLITS[name]))
    assert (folder / "original_splits" / "train.txt").read_text() == (hand / "original_splits" / "train.txt").read_text()
    assert not (folder / "original_splits" / "val.txt").exists()  # empty split: no file
    for task in TASKS:
        name = task["task_name"]
        stored = np.load(folder / "task_labels" / f"{name}.npy", allow_pickle=False)
        np.testing.assert_array_equal(stored, np.load(hand / "task_labels" / f"{name}.npy"))
        assert stored.dtype == np.int64
    for i in (0, 7, 11):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / "images" / f"{i:06d}.tiff")),
                                      np.asarray(Image.open(hand / "images" / f"{i:06d}.tiff")))
    assert (folder / "LICENSE").read_text() == "CC0\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_derived_info_fields(tmp_path):
    folder = _write(tmp_path)
    raw = yaml.safe_load((folder / "info.yaml").read_text())
    assert list(raw)[:5] == ["id", "name", "summary", "domain", "tasks"]
    assert raw["input_size"] == [3, 6, 5] and raw["total_num_samples"] == 12
    assert raw["splits_num_samples"] == {"train": 8, "val": 2, "test": 2}
    assert raw["original_splits_num_samples"] == {"train": 10, "val": 0, "test": 2}
    assert raw["class_counts"]["organ"] == {0: 4, 1: 4, 2: 4}
    assert raw["class_counts"]["Field definition"] == {k: 12 // 5 + (ORDINAL_KEYS.index(k) < 12 % 5) for k in ORDINAL_KEYS}
    assert raw["class_counts"]["findings"] == {b: sum((i >> b) & 1 for i in range(12)) for b in range(3)}
    info = read_info(folder)
    assert info.subject_overlaps == ("hand_gray_as_rgb", "renamed_elsewhere") and info.license == "CC0"
    # original splits default to the splits; grayscale input; binary given as (N, 1); a DatasetInfo as info
    gray = np.zeros((4, 3, 3, 1), np.uint8)
    info2 = {"id": "g", "name": "G", "domain": "D",
             "tasks": [{"task_name": "t", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "n", 1: "p"}}]}
    folder2 = write_dataset(tmp_path, info2, gray, {"t": np.asarray([[0], [1], [1], [0]])}, {"train": [0, 1], "test": [2, 3]})
    raw2 = yaml.safe_load((folder2 / "info.yaml").read_text())
    assert raw2["input_size"] == [1, 3, 3] and raw2["original_splits_num_samples"] == raw2["splits_num_samples"]
    assert np.load(folder2 / "task_labels" / "t.npy").shape == (4,)
    with h5py.File(folder2 / "images.hdf5") as f:
        assert f["images"].shape == (4, 3, 3)
    again = write_dataset(tmp_path / "other", DatasetInfo.from_yaml(folder2 / "info.yaml"), gray,
                          {"t": np.asarray([0, 1, 1, 0])}, {"train": [0, 1], "test": [2, 3]})
    assert yaml.safe_load((again / "info.yaml").read_text()) == raw2


def test_round_trip_through_the_reader(tmp_path):
    _write(tmp_path, write_tiffs=True)
    meta = MetaDataset(tmp_path)
    entry = meta.task("hand_rgb", "Field definition")
    assert entry.target == "ORDINAL_REGRESSION" and entry.num_classes == 5 and entry.num_samples == 12
    src = meta.source("hand_rgb", "findings", split="val")
    assert src.image_indices.tolist() == [8, 9]
    np.testing.assert_array_equal(src.labels, HAND_RGB_LABELS["findings"][[8, 9]])
    tif = meta.source("hand_rgb", "findings", split="val", image_format="tiff")
    assert np.array_equal(src.read_images([0, 1]).numpy(), tif.read_images([0, 1]).numpy())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(info={k: v for k, v in INFO.items() if k != "domain"}), r"info field\(s\) \['domain'\] missing"),
        (dict(images=rgb_pixels(12, 6, 5).astype(np.float32)), r"argument 'images': dtype float32, expected uint8"),
        (dict(images=np.zeros((12, 6, 5, 4), np.uint8)), r"argument 'images': shape \(12, 6, 5, 4\)"),
        (dict(images=[np.zeros((6, 5, 3), np.uint8)] * 11 + [np.zeros((5, 5, 3), np.uint8)]),
         r"argument 'images\[11\]': shape \(5, 5, 3\) differs from images\[0\]"),
        (dict(task_labels={**HAND_RGB_LABELS, "organ": np.arange(11) % 3}),
         r"'task_labels\['organ'\]': holds 11 labels, expected one per image: total_num_samples = 12"),
        (dict(task_labels={**HAND_RGB_LABELS, "Field definition": np.arange(12)}),
         r"'task_labels\['Field definition'\]': values \[0, 2, 3, 5, 7, 9, 11\] are not label keys"),
        (dict(task_labels={k: v for k, v in HAND_RGB_LABELS.items() if k != "malignant"}),
         r"argument 'task_labels': .* missing \['malignant'\]"),
        (dict(task_labels={**HAND_RGB_LABELS, "extra": np.zeros(12)}), r"not in info.tasks \['extra'\]"),
        (dict(splits={**HAND_RGB_SPLITS, "test": [10, 12]}),
         r"argument 'splits\['test'\]': names images \[12\] that do not exist \(the dataset has 12 images"),
        (dict(splits={**HAND_RGB_SPLITS, "test": [10, 11, 9]}), r"images \[9\] are in both 'val' and 'test'"),
        (dict(splits={**HAND_RGB_SPLITS, "test": [10]}), r"argument 'splits': images \[11\] .* are in no split"),
        (dict(original_splits={"train": [0, 0], "test": list(range(1, 12))}),
         r"'original_splits\['train'\]': lists images \[0\] more than once"),
        (dict(info={**INFO, "total_num_samples": 13}), r"info field 'total_num_samples' = 13, but the data give 12"),
        (dict(info={**INFO, "input_size": [1, 6, 5]}), r"info field 'input_size' = \[1, 6, 5\], but the data give \[3, 6, 5\]"),
        (dict(info={**INFO, "tasks": TASKS[:1] + [{**TASKS[1], "labels": {0: "x"}}] + TASKS[2:]}),
         r"field 'tasks\[1\]\.labels': a BINARY_CLASSIFICATION task needs exactly 2 labels"),
    ],
)
def test_bad_input_is_rejected_before_anything_is_written(tmp_path, change, message):
    with pytest.raises(DataFormatError, match=message):
        _write(tmp_path, **change)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    first = _write(tmp_path)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _write(tmp_path)
    _write(tmp_path, images=255 - rgb_pixels(12, 6, 5), overwrite=True)
    with h5py.File(first / "images.hdf5") as f:
        assert f["images"][0, 0, 0, 0] == 255
    # a crash half-way through leaves the previous dataset and no temporary folder behind
    real = writer_module._write_folder

    def crash(folder, *args):
        real(folder, *args)
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer_module, "_write_folder", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hand_rgb"]
    with h5py.File(first / "images.hdf5") as f:
        assert f["images"][0, 0, 0, 0] == 255


def test_from_folder_with_names_keys_multilabel_and_resizing(tmp_path):
    image_dir = tmp_path / "raw"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,diagnosis,grade,findings,split"]
    sizes = [(20, 30), (24, 24), (20, 30), (10, 12), (20, 30), (16, 16)]
    names = ["nevus", "melanoma", "nevus", "melanoma", "nevus", "nevus"]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_dir / f"img{i}.png")
        rows.append(f"img{i}.png,{names[i]},{[0, 2, 5][i % 3]},{['', 'a', 'a|b', 'b', '', 'a'][i]},"
                    f"{['train', 'train', 'train', 'val', 'test', 'test'][i]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    info = {"id": "mine", "name": "My Data", "domain": "Dermatoscopy", "tasks": [
        {"task_name": "diagnosis", "task_target": "BINARY_CLASSIFICATION", "labels": {0: "nevus", 1: "melanoma"}},
        {"task_name": "grade", "task_target": "ORDINAL_REGRESSION", "labels": {0: "g0", 2: "g2", 5: "g5"}},
        {"task_name": "findings", "task_target": "MULTILABEL_CLASSIFICATION", "labels": {0: "a", 1: "b"}}]}
    folder = write_dataset_from_folder(tmp_path / "out", info, image_dir, tmp_path / "labels.csv", image_column="file",
                                       image_size=8, channels=1)
    assert np.load(folder / "task_labels" / "diagnosis.npy").tolist() == [0, 1, 0, 1, 0, 0]
    assert np.load(folder / "task_labels" / "grade.npy").tolist() == [0, 2, 5, 0, 2, 5]
    assert np.load(folder / "task_labels" / "findings.npy").tolist() == [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0], [1, 0]]
    assert (folder / "splits" / "val.txt").read_text() == "images/000003.tiff"
    with h5py.File(folder / "images.hdf5") as f:
        stored = f["images"][:]
    assert stored.shape == (6, 8, 8)
    expected = np.asarray(Image.open(image_dir / "img3.png").convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(stored[3], expected)
    src = MedIMetaTaskSource(folder.parent, "mine", "grade", split="test")
    assert src.labels.tolist() == [2, 5] and src.image_shape == (1, 8, 8)
    # without split column: a seeded random split; without image_size, mixed sizes are an error
    random_split = write_dataset_from_folder(tmp_path / "out2", info, image_dir, tmp_path / "labels.csv",
                                             image_column="file", split_column=None, image_size=(6, 4))
    assert sum(read_info(random_split).splits_num_samples.values()) == 6
    with pytest.raises(DataFormatError, match=r"labels\.csv: row 3: image .*img1\.png has size \(24, 24\).*pass image_size"):
        write_dataset_from_folder(tmp_path / "out3", info, image_dir, tmp_path / "labels.csv", image_column="file")


def test_from_folder_errors_name_the_csv_row_and_column(tmp_path):
    image_dir = tmp_path / "raw"
    image_dir.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(image_dir / "a.png")
    info = {"id": "x", "name": "X", "domain": "D",
            "tasks": [{"task_name": "t", "task_target": "MULTICLASS_CLASSIFICATION", "labels": {0: "cat", 1: "dog"}}]}
    csv = tmp_path / "l.csv"
    csv.write_text("filename,t,split\na.png,cat,train\nb.png,dog,test\n")
    with pytest.raises(MissingDataError, match=r"l\.csv: row 3, column 'filename': image file .*b\.png not found"):
        write_dataset_from_folder(tmp_path / "o", info, image_dir, csv)
    csv.write_text("filename,t,split\na.png,bird,train\n")
    with pytest.raises(DataFormatError, match=r"l\.csv: row 2, column 't': 'bird' is neither a label key nor a class name"):
        write_dataset_from_folder(tmp_path / "o", info, image_dir, csv)
    csv.write_text("filename,t,split\na.png,cat,training\n")
    with pytest.raises(DataFormatError, match=r"row 2, column 'split': split 'training', expected one of"):
        write_dataset_from_folder(tmp_path / "o", info, image_dir, csv)
    csv.write_text("filename,label,split\na.png,cat,train\n")
    with pytest.raises(DataFormatError, match=r"l\.csv: no column 't' \(labels of task 't'\)"):
        write_dataset_from_folder(tmp_path / "o", info, image_dir, csv)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    os.remove(csv)
    with pytest.raises(MissingDataError, match=r"l\.csv: labels CSV not found"):
        write_dataset_from_folder(tmp_path / "o", info, image_dir, csv)
