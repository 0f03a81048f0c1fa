"""The embedded real-image meta-dataset: deterministic, readable, honest labels, disjoint splits.

Labels are recomputed here from the package images with independent code (scikit-image's
``rgb2hed`` and ``regionprops``, nibabel, pydicom) following the rules each ``info.yaml`` states.
"""
from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from medmeta.data.meta_dataset import MetaDataset
from medmeta.errors import UserError
from medmeta.recipes import package_files as pf
from medmeta.recipes import package_images as pi
from medmeta.recipes import real_mini as rm

SIZE = 32  # small images keep the tests fast; selection and labels do not depend on the size

# keys of MedIMeta v1.0 info.yaml files (MEDIMETA_FORMAT.md)
MEDIMETA_KEYS = {
    "id", "name", "summary", "domain", "tasks", "input_size", "total_num_samples", "splits_num_samples",
    "original_splits_num_samples", "domain_overlaps", "subject_overlaps", "license", "project_website",
    "download_url", "DOI", "original_data",
}
RGB = {"mini_ihc", "mini_he_skin", "mini_fundus"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rm.build_real_mini_meta_dataset(tmp_path_factory.mktemp("real_mini"), seed=0, image_size=SIZE)


def _provenance(root: Path, dataset_id: str) -> list[dict[str, str]]:
    with open(root / dataset_id / "provenance.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _labels(root: Path, dataset_id: str, task: str) -> np.ndarray:
    return np.load(root / dataset_id / "task_labels" / f"{task}.npy")


def _split_of(root: Path, dataset_id: str) -> dict[int, str]:
    out = {}
    for split in ("train", "val", "test"):
        for line in (root / dataset_id / "splits" / f"{split}.txt").read_text().split("\n"):
            out[int(Path(line).stem)] = split
    return out


def _sample(rows: list[dict[str, str]], k: int = 12) -> list[dict[str, str]]:
    step = max(1, len(rows) // k)
    return rows[::step][:k]


# ---------------------------------------------------------------------------------------------
def test_every_dataset_written_with_medimeta_fields(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(rm.REAL_MINI_DATASETS)
    domains = set()
    for dataset_id in rm.REAL_MINI_DATASETS:
        info = yaml.safe_load((root / dataset_id / "info.yaml").read_text(encoding="utf-8"))
        assert MEDIMETA_KEYS <= set(info), MEDIMETA_KEYS - set(info)
        assert info["id"] == dataset_id
        assert info["input_size"] == [3 if dataset_id in RGB else 1, SIZE, SIZE]
        assert set(info["label_derivation"]) >= {t["task_name"] for t in info["tasks"]}
        assert all(v != "not installed" for v in info["source"]["packages"].values())
        assert 150 <= info["total_num_samples"] <= 500
        domains.add(info["domain"])
        for other in info["domain_overlaps"] + info["subject_overlaps"]:
            assert other in rm.REAL_MINI_DATASETS and other != dataset_id
            back = yaml.safe_load((root / other / "info.yaml").read_text(encoding="utf-8"))
            assert dataset_id in back["domain_overlaps"]  # overlaps are symmetric
    assert len(domains) >= 5
    kinds = {
        t["task_target"]
        for d in rm.REAL_MINI_DATASETS
        for t in yaml.safe_load((root / d / "info.yaml").read_text(encoding="utf-8"))["tasks"]
    }
    assert kinds == {"MULTICLASS_CLASSIFICATION", "BINARY_CLASSIFICATION", "MULTILABEL_CLASSIFICATION",
                     "ORDINAL_REGRESSION"}


def test_reads_back_through_meta_dataset_with_stated_classes_and_sizes(root: Path) -> None:
    md = MetaDataset(root)
    assert sorted(md.dataset_ids) == sorted(rm.REAL_MINI_DATASETS)
    assert len(md.tasks) == 13
    for entry in md.tasks:
        info = md.info(entry.dataset_id)
        task = info.task(entry.task_name)
        total = 0
        for split in ("train", "val", "test"):
            src = md.source(entry.dataset_id, entry.task_name, split=split)
            assert len(src) == info.splits_num_samples[split]
            total += len(src)
            labels = np.asarray(src.labels)
            if task.task_target.value == "MULTILABEL_CLASSIFICATION":
                assert labels.shape == (len(src), task.num_classes)
                pos = labels.sum(axis=0)
                assert (pos >= rm.MIN_PER_CLASS).all() and (len(src) - pos >= rm.MIN_PER_CLASS).all(), (entry, split)
            else:
                labels = labels.reshape(-1)
                assert set(np.unique(labels)) == set(task.label_keys), (entry, split)
                counts = {k: int((labels == k).sum()) for k in task.label_keys}
                assert min(counts.values()) >= rm.MIN_PER_CLASS, (entry, split, counts)
            x = src.read_images(np.arange(min(4, len(src))))
            assert tuple(x.shape) == (min(4, len(src)), info.num_channels, SIZE, SIZE)
            assert torch.isfinite(x).all() and x.std() > 0
        assert total == info.total_num_samples
        # the stored class counts are what the label file holds
        stored = _labels(root, entry.dataset_id, entry.task_name)
        if stored.ndim == 2:
            assert entry.class_counts == {k: int(stored[:, k].sum()) for k in range(stored.shape[1])}
        else:
            assert entry.class_counts == {k: int((stored == k).sum()) for k in task.label_keys}


def test_build_is_deterministic_for_a_seed_and_changes_with_it(root: Path, tmp_path: Path) -> None:
    subset = ["mini_ihc", "mini_nuclei", "mini_brain_patches", "mini_dicom"]
    again = rm.build_real_mini_meta_dataset(tmp_path / "again", seed=0, image_size=SIZE, datasets=subset)
    for dataset_id in subset:
        a, b = root / dataset_id, again / dataset_id
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        for f in files:
            assert filecmp.cmp(a / f, b / f, shallow=False), f"{dataset_id}/{f} differs between two builds"
    other = rm.build_real_mini_dataset("mini_nuclei", seed=1, image_size=SIZE)
    first = rm.build_real_mini_dataset("mini_nuclei", seed=0, image_size=SIZE)
    assert other.splits != first.splits


def test_images_are_resized_crops_of_the_source(root: Path) -> None:
    import h5py

    source = pi.ihc_image()
    with h5py.File(root / "mini_ihc" / "images.hdf5", "r") as h5:
        images = h5["images"][()]
    assert images.shape[1:] == (SIZE, SIZE, 3) and images.dtype == np.uint8
    for row in _sample(_provenance(root, "mini_ihc"), 5):
        y, x, side = int(row["y"]), int(row["x"]), int(row["side"])
        crop = torch.from_numpy(source[y:y + side, x:x + side].astype(np.float32)).permute(2, 0, 1)[None]
        want = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        want = want.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
        np.testing.assert_array_equal(images[int(row["index"])], want)


def test_histology_labels_follow_the_stated_rules(root: Path) -> None:
    from skimage.color import rgb2hed

    r = rm.RULES["mini_ihc"]
    ihc = pi.ihc_image()
    dab_area = _labels(root, "mini_ihc", "DAB-positive area")
    components = _labels(root, "mini_ihc", "stained components")
    for row in _sample(_provenance(root, "mini_ihc")):
        i, y, x, s = int(row["index"]), int(row["y"]), int(row["x"]), int(row["side"])
        crop = ihc[y:y + s, x:x + s]
        hed = rgb2hed(crop)
        dab = (hed[..., 2] >= r["dab_od"]).mean()
        hem = (hed[..., 0] >= r["hem_od"]).mean()
        clear = (crop.min(axis=-1) >= r["clear_min_rgb"]).mean()
        assert dab == pytest.approx(float(row["dab_fraction"]), abs=1e-6)
        assert dab_area[i] == (0 if dab < 0.3 else 1 if dab < 0.7 else 2)
        assert components[i].tolist() == [int(dab >= 0.5), int(hem >= 0.14), int(clear >= 0.02)]

    r = rm.RULES["mini_he_skin"]
    he = pi.aperio_he_region()
    fraction = _labels(root, "mini_he_skin", "tissue fraction")
    content = _labels(root, "mini_he_skin", "dominant content")
    for row in _sample(_provenance(root, "mini_he_skin")):
        i, y, x, s = int(row["index"]), int(row["y"]), int(row["x"]), int(row["side"])
        crop = he[y:y + s, x:x + s]
        tissue = crop.min(axis=-1) < r["tissue_max_min_rgb"]
        hem = tissue & (rgb2hed(crop)[..., 0] >= r["hem_od"])
        t = tissue.mean()
        assert fraction[i] == (0 if t < 0.25 else 25 if t < 0.5 else 50 if t < 0.75 else 75)
        assert content[i] == (0 if t < 0.5 else 1 if hem.sum() >= 0.3 * tissue.sum() else 2)


def test_nuclei_labels_are_counted_from_the_ground_truth_mask(root: Path) -> None:
    from skimage.measure import regionprops

    _, mask = pi.fluorescence_nuclei()
    centroids = np.array([p.centroid for p in regionprops(mask.astype(np.int32))])
    count = _labels(root, "mini_nuclei", "nuclei count")
    area = _labels(root, "mini_nuclei", "nuclear area")
    for row in _provenance(root, "mini_nuclei"):  # every image: cheap
        i, y, x, s = int(row["index"]), int(row["y"]), int(row["x"]), int(row["side"])
        inside = ((centroids[:, 0] >= y) & (centroids[:, 0] < y + s) & (centroids[:, 1] >= x)
                  & (centroids[:, 1] < x + s)).sum()
        assert int(row["nuclei_count"]) == inside
        assert count[i] == min(int(inside), 2)
        assert area[i] == int((mask[y:y + s, x:x + s] > 0).mean() >= 0.2)


def test_fundus_labels_follow_the_stated_rules(root: Path) -> None:
    from scipy import ndimage as ndi

    r = rm.RULES["mini_fundus"]
    image = pi.retina_image()
    maps = rm.fundus_pixel_maps(image)
    fy, fx = maps["fovea"]
    assert abs(fy - 708) < 20 and abs(fx - 704) < 20  # the dark macula centre, located by eye
    green = image[..., 1].astype(np.float32)
    vessel = ((ndi.gaussian_filter(green, r["vessel_sigma"]) - green) >= r["vessel_contrast"]) & (image[..., 0] > 30)
    density = _labels(root, "mini_fundus", "vessel density")
    zone = _labels(root, "mini_fundus", "distance from fovea")
    for row in _provenance(root, "mini_fundus"):  # every image: the maps are computed once
        i, y, x, s = int(row["index"]), int(row["y"]), int(row["x"]), int(row["side"])
        assert (image[y:y + s, x:x + s, 0] > r["fov_red"]).mean() >= 0.99
        v = vessel[y:y + s, x:x + s].mean()
        assert density[i] == (0 if v < 0.04 else 1 if v < 0.11 else 2)
        d = np.hypot(y + s / 2 - fy, x + s / 2 - fx)
        assert zone[i] == (0 if d < 350 else 1 if d < 500 else 2)


def test_brain_labels_follow_the_templates(root: Path) -> None:
    import nibabel as nib

    def load(key: str) -> np.ndarray:
        return np.asarray(nib.load(pf.MNI152[key].locate()).dataobj)

    t1, gm, wm = load("t1"), load("gm"), load("wm")
    nz = np.argwhere(t1 > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    crop = [v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] for v in (t1, gm, wm)]

    plane = _labels(root, "mini_brain_slices", "slice plane")
    distance = _labels(root, "mini_brain_slices", "distance from brain centre")
    for row in _sample(_provenance(root, "mini_brain_slices")):
        i, axis = int(row["index"]), ("sagittal", "coronal", "axial").index(row["plane"])
        n = hi[axis] - lo[axis]
        rel = abs(int(row["slice_in_brain_box"]) - (n - 1) / 2) / (n / 2)
        assert plane[i] == axis
        assert distance[i] == int(np.digitize(rel, [0.25, 0.5, 0.75]))

    content = _labels(root, "mini_brain_patches", "predominant content")
    present = _labels(root, "mini_brain_patches", "tissues present")
    for row in _sample(_provenance(root, "mini_brain_patches")):
        i, z, s = int(row["index"]), int(row["axial_slice_in_brain_box"]), int(row["side"])
        x, y = int(row["x"]), int(row["y"])
        t, g, w = (v[x:x + s, y:y + s, z] for v in crop)
        inside = t > 0
        g_m = inside & (g >= 128)
        w_m = inside & (w >= 128) & ~g_m
        other = inside & ~g_m & ~w_m
        fr = [g_m.mean(), w_m.mean(), 1 - inside.mean()]
        assert content[i] == int(np.argmax(fr))
        assert present[i].tolist() == [int(g_m.mean() >= 0.45), int(w_m.mean() >= 0.25), int(other.mean() >= 0.05)]


def test_dicom_label_is_the_modality_tag(root: Path) -> None:
    import pydicom

    modality = _labels(root, "mini_dicom", "modality")
    keys = {"CT": 0, "MR": 1, "CR": 2, "US": 3}
    rows = _provenance(root, "mini_dicom")
    assert {r["modality_tag"] for r in rows} == set(keys)
    for row in _sample(rows, 16):
        package, relative = row["source"].split("/", 1)
        ds = pydicom.dcmread(pf.package_file(package, relative), stop_before_pixels=True)
        assert modality[int(row["index"])] == keys[str(ds.Modality)]


@pytest.mark.parametrize("dataset_id", ["mini_ihc", "mini_he_skin", "mini_nuclei", "mini_fundus", "mini_dicom"])
def test_patches_of_different_splits_never_overlap(root: Path, dataset_id: str) -> None:
    split = _split_of(root, dataset_id)
    rows = _provenance(root, dataset_id)
    by_split: dict[str, list[tuple[str, int, int, int]]] = {"train": [], "val": [], "test": []}
    for row in rows:
        by_split[split[int(row["index"])]].append((row["source"], int(row["y"]), int(row["x"]), int(row["side"])))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for src, y, x, s in by_split[a]:
            for src2, y2, x2, s2 in by_split[b]:
                if src == src2:
                    assert y + s <= y2 or y2 + s2 <= y or x + s <= x2 or x2 + s2 <= x, (dataset_id, a, b)


def test_brain_slabs_are_disjoint_across_splits(root: Path) -> None:
    split = _split_of(root, "mini_brain_patches")
    slabs: dict[int, set[str]] = {}
    for row in _provenance(root, "mini_brain_patches"):
        slabs.setdefault(int(row["axial_slice_in_brain_box"]) // 8, set()).add(split[int(row["index"])])
    assert all(len(s) == 1 for s in slabs.values())


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown real_mini dataset.*mini_ihc"):
        rm.build_real_mini_meta_dataset(tmp_path, datasets=["mini_nope"])
    with pytest.raises(ValueError, match="image_size"):
        rm.build_real_mini_dataset("mini_nuclei", image_size=4)
    with pytest.raises(pf.PackageFileError, match="not found"):
        pf.package_file("skimage", "data/no_such_image.png", "scikit-image")


def test_every_task_and_split_serves_5_shot_10_query_episodes(root: Path) -> None:
    from medmeta.episodes.samplers import FewShotSampler

    md = MetaDataset(root)
    for entry in md.tasks:
        for split in ("train", "val", "test"):
            src = md.source(entry.dataset_id, entry.task_name, split=split)
            sampler = FewShotSampler(src, n_way=None, n_shot=5, n_query=10, seed=0, on_insufficient="error")
            k = src.description.num_classes
            for spec in sampler.specs(3):
                support, query = np.asarray(spec.support_labels), np.asarray(spec.query_labels)
                if src.description.task_target.value == "MULTILABEL_CLASSIFICATION":
                    # every label kept, with >= 5 positives and negatives in the support
                    assert support.shape[1] == k and (support.sum(0) >= 5).all() and ((1 - support).sum(0) >= 5).all()
                    assert (query.sum(0) >= 10).all()
                elif src.description.task_target.value == "BINARY_CLASSIFICATION":
                    assert support.reshape(-1).tolist().count(1) == 5 and len(support) == 10 and len(query) == 20
                else:  # every class, 5 support and 10 query images each
                    assert np.bincount(support.reshape(-1), minlength=k).tolist() == [5] * k
                    assert np.bincount(query.reshape(-1), minlength=k).tolist() == [10] * k


# ---------------------------------------------------------------------------------------------
# the one locator for shipped files, and the bytes the embedded cache is keyed on
# ---------------------------------------------------------------------------------------------
def test_every_named_package_file_ships() -> None:
    files = [pf.IHC, pf.RETINA, pf.APERIO_HE, *pf.NUCLEI_2D, *pf.NUCLEI_3D, *pf.MNI152.values(), *pf.DICOM.values()]
    for file in files:
        path = file.locate()
        assert path.is_file() and path.as_posix().endswith(file.path), file


def test_a_missing_package_is_a_user_error_naming_the_install_command() -> None:
    with pytest.raises(pf.PackageFileError) as info:
        pf.package_file("no_such_package_medmeta", "data/img.tif", "stardist")
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "'no_such_package_medmeta' (distribution 'stardist') is not installed" in message
    assert "pip install --no-deps 'stardist==0.9.2' (a line of requirements-nodeps.txt)" in message
    with pytest.raises(pf.PackageFileError, match=r"pip install pydicom-data$"):
        pf.PackageFile("pydicom-data", "no_such_package_medmeta/x.dcm").locate()


def test_nodeps_pins_match_requirements_nodeps_txt() -> None:
    text = (Path(__file__).resolve().parents[2] / "requirements-nodeps.txt").read_text()
    lines = {line.split("==")[0]: line for line in text.splitlines() if line and not line.startswith("#")}
    for distribution, line in pf.NODEPS_REQUIREMENTS.items():
        assert lines[distribution] == line


def _digest(images: np.ndarray, labels: dict[str, np.ndarray], splits: dict[str, list[int]]) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    for key in sorted(labels):
        h.update(key.encode())
        h.update(np.ascontiguousarray(labels[key], dtype=np.int64).tobytes())
    for split in ("train", "val", "test"):
        h.update(np.asarray(splits[split], dtype=np.int64).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dataset_id, expected", [
    ("mini_nuclei", "256a8cf94a0a0c1ae220bb0e7704b08488d490b2cb2f615c4695c5ed9ac85f32"),
    ("mini_dicom", "59bb4d93863fb70f2240f3e6e4631000a6225fea826fec39c4e6abf986ecf609"),
])
def test_default_build_bytes_are_those_of_the_cached_version(dataset_id: str, expected: str) -> None:
    """The embedded cache folder is named after REAL_MINI_VERSION: if this fails, the recipe
    writes other bytes than before, so bump REAL_MINI_VERSION and record the new digest."""
    assert rm.REAL_MINI_VERSION == 1
    built = rm.build_real_mini_dataset(dataset_id, seed=0, image_size=64)
    assert _digest(built.images, built.labels, built.splits) == expected
