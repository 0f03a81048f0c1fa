"""VisioMel end to end: synthetic slides whose label is a drawn pattern, tiled, embedded, MIL-trained,
run through the exported ``main.py`` on a ``data/`` folder, and scored with the challenge's log loss."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss

from medmeta.adapters.slides import visiomel as vm
from medmeta.adapters.slides.synthetic import make_synthetic_slide

SLIDE = dict(size=(512, 512), blobs=2, lesions=4, lesion_radius=0.08, compression="jpeg", tile=128)
TILING = {"tile_size": 32, "mpp": 1.0, "min_tissue": 0.5}
METADATA_KINDS = {"age": "age_bin", "sex": "sex", "body_site": "categorical", "melanoma_history": "yes_no"}
AGE_BIN = "[46:48["  # a metadata value that must never appear in the runner's output


def _slides(folder: Path, prefix: str, n: int, seed: int) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        y = i % 2  # relapse <=> lesions drawn
        make_synthetic_slide(folder / f"{prefix}{i}.tif", seed=seed + i, pattern="lesions" if y else None, **SLIDE)
        rows.append({"filename": f"{prefix}{i}.tif", "age": AGE_BIN if i % 3 else "[60:62[", "sex": 1 + i % 2,
                     "body_site": ["arm", "trunk"][i % 2 if i % 4 else 0], "melanoma_history": ["YES", "NO", ""][i % 3],
                     "resolution": 0.5, "relapse": y})
    return pd.DataFrame(rows)


@dataclass
class VisioMelSetup:
    root: Path
    assets: Path
    model: vm.VisioMelModel
    test_table: pd.DataFrame


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> VisioMelSetup:
    root = tmp_path_factory.mktemp("visiomel")
    train = _slides(root / "train_slides", "tr", 16, seed=0)
    test = _slides(root / "test_slides", "te", 10, seed=100)
    torch.manual_seed(0)
    model = vm.train_visiomel(
        train.drop(columns="resolution"), root / "train_slides", root / "assets", root / "cache",
        backbone="medmeta_conv4_tiny", tiling=TILING, max_tiles=64, head="abmil", epochs=30, lr=3e-3,
        metadata_kinds=METADATA_KINDS, folds=2, device="cpu",
    )
    return VisioMelSetup(root, root / "assets", model, test)


def _data_dir(setup: VisioMelSetup, dest: Path, names=None) -> Path:
    """A challenge ``data/`` folder: test slides, metadata (no labels) and a shuffled format file."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    table = setup.test_table if names is None else setup.test_table[setup.test_table.filename.isin(names)]
    for name in table.filename:
        shutil.copy2(setup.root / "test_slides" / name, dest / name)
    table.drop(columns="relapse").to_csv(dest / "test_metadata.csv", index=False)
    table[["filename"]].assign(relapse=0.5).sample(frac=1, random_state=3).to_csv(dest / "submission_format.csv", index=False)
    return dest


# ---- metric and format --------------------------------------------------------------------
def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = rng.uniform(0.01, 0.99, 50)
    assert vm.visiomel_log_loss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-12)
    # certain and wrong: clipped at the challenge's eps 1e-16 (sklearn >= 1.5 clips at the dtype's eps instead)
    # (1 - 1e-16 rounds to 1 - 2**-53 in float64, as it did in sklearn's clip)
    expected = (-np.log(1e-16) - np.log(1 - np.float64(1 - 1e-16))) / 2
    assert vm.visiomel_log_loss([1, 0], [0.0, 1.0]) == pytest.approx(expected, rel=1e-9)
    assert vm.visiomel_log_loss([0, 1], [0.5, 0.5]) == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        vm.visiomel_log_loss([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="2 labels for 3 predictions"):
        vm.visiomel_log_loss([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        vm.visiomel_log_loss([0, 1], [0.1, float("nan")])


def test_validate_submission_checks_order_columns_and_range():
    fmt = pd.DataFrame({"filename": ["b.tif", "a.tif"], "relapse": [0.0, 0.0]})
    vm.validate_submission(pd.DataFrame({"filename": ["b.tif", "a.tif"], "relapse": [0.2, 1.0]}), fmt)
    with pytest.raises(ValueError, match="does not match the format's rows and order"):
        vm.validate_submission(pd.DataFrame({"filename": ["a.tif", "b.tif"], "relapse": [0.2, 0.3]}), fmt)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        vm.validate_submission(pd.DataFrame({"filename": ["b.tif", "a.tif"], "relapse": [0.2, 1.3]}), fmt)
    with pytest.raises(ValueError, match="columns"):
        vm.validate_submission(pd.DataFrame({"filename": ["b.tif", "a.tif"], "p": [0.2, 0.3]}), fmt)
    with pytest.raises(ValueError, match="missing or non-numeric"):
        vm.validate_submission(pd.DataFrame({"filename": ["b.tif", "a.tif"], "relapse": [0.2, None]}), fmt)


def test_metadata_encoder():
    df = pd.DataFrame({"age": ["[40:42[", "[60:62[", None], "sex": [1, 2, 2], "site": ["arm", "leg", "arm"],
                       "hist": ["YES", "NO", ""]})
    enc = vm.MetadataEncoder({"age": "age_bin", "sex": "sex", "site": "categorical", "hist": "yes_no"}).fit(df)
    x = enc.transform(df)
    np.testing.assert_allclose(x, [[0.41, 0, 1, 0, 1], [0.61, 1, 0, 1, 0], [0.51, 1, 1, 0, 0.5]])
    enc2 = vm.MetadataEncoder.from_dict(enc.to_dict())
    np.testing.assert_allclose(enc2.transform(df), x)
    with pytest.raises(ValueError, match=r"metadata column\(s\) \['hist'\] missing"):
        enc.transform(df.drop(columns="hist"))
    with pytest.raises(ValueError, match="kind 'date'"):
        vm.MetadataEncoder({"age": "date"})


# ---- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_exported_main_writes_a_valid_submission_that_beats_chance(trained, tmp_path):
    """Train (fixture) -> export main.py + assets -> ``python main.py`` on data/ -> score."""
    assert trained.model.combiner is not None and len(trained.model.combiner["meta"]) == 5  # age, sex, 2 sites, history
    sub_dir = vm.export_submission(tmp_path / "submission", trained.assets)
    assert (sub_dir / "main.py").read_text() == vm.TEMPLATE_PATH.read_text()
    data = _data_dir(trained, sub_dir / "data")
    proc = subprocess.run([sys.executable, str(sub_dir / "main.py"), "--device", "cpu", "--batch-size", "32"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "slide 10/10 processed" in out
    for value in (AGE_BIN, "te3.tif", "trunk"):  # no data values in the logs
        assert value not in out
    sub = pd.read_csv(sub_dir / "submission.csv")
    fmt = pd.read_csv(data / "submission_format.csv")
    vm.validate_submission(sub, fmt)
    assert list(sub.filename) == list(fmt.filename)
    report = json.loads((sub_dir / "submission_report.json").read_text())
    assert [e["status"] for e in report["slides"]] == ["ok"] * 10
    truth = trained.test_table.set_index("filename").loc[sub.filename, "relapse"].to_numpy()
    score = vm.visiomel_log_loss(truth, sub.relapse)
    chance = vm.visiomel_log_loss(truth, np.full(len(truth), trained.model.prior))  # the constant prior
    assert score < 0.5 * chance, (score, chance)
    assert ((sub.relapse > 0.5) == (truth == 1)).mean() >= 0.8


def test_slide_source_episodes_and_mil_learner_beat_chance(trained, tmp_path, monkeypatch):
    """The same slides as a task source of cached bags: K-shot slide episodes with a MIL learner."""
    from medmeta.adapters.slides import features
    from medmeta.adapters.slides.dataset import SlideTaskSource, sample_slide_episodes
    from medmeta.adapters.slides.mil import MILLearner

    table = trained.test_table
    kwargs = dict(tiling=TILING, max_tiles=64, domain_column="resolution", metadata_columns=["age"], device="cpu")
    source = SlideTaskSource(table, trained.root / "test_slides", "relapse", trained.model.backbone,
                             tmp_path / "cache", **kwargs)
    assert len(source) == 10 and source.description.num_classes == 2 and source.failures == {}
    assert source.read_images([0, 1]).sizes == [len(source.bag(0)), len(source.bag(1))]
    assert (source.domains == 0.5).all() and list(source.metadata.columns) == ["age"]
    # a second source is served from the cache: no tile is read or embedded again
    monkeypatch.setattr(features, "embed_tiles", lambda *a, **k: pytest.fail("cache miss"))
    again = SlideTaskSource(table, trained.root / "test_slides", "relapse", trained.model.backbone,
                            tmp_path / "cache", **kwargs)
    torch.testing.assert_close(again.bag(3), source.bag(3))
    episodes = sample_slide_episodes(source, k_shot=2, n_query=3, n_episodes=3, seed=0)
    learner = MILLearner(head="abmil", epochs=25, lr=3e-3)
    correct = total = 0
    for ep in episodes:
        assert ep.support_labels.shape == (4, 1) and len(ep.query_images) == 6
        logits = learner.adapt(ep.support_images, ep.support_labels, ep.description)(ep.query_images)
        correct += int(((logits > 0).float() == ep.query_labels).sum())
        total += len(ep.query_labels)
    assert correct / total >= 0.8, correct / total
    with pytest.raises(ValueError, match="has 5 slides; an episode needs"):
        sample_slide_episodes(source, k_shot=3, n_query=3)


# ---- failures, budget, bad input ---------------------------------------------------------
def test_failed_slides_are_reported_while_the_others_finish(trained, tmp_path):
    data = _data_dir(trained, tmp_path / "data", names=["te0.tif", "te1.tif", "te2.tif"])
    blob = (data / "te1.tif").read_bytes()
    (data / "te1.tif").write_bytes(blob[: len(blob) // 3])  # truncated
    fmt = pd.read_csv(data / "submission_format.csv")
    fmt = pd.concat([fmt, pd.DataFrame({"filename": ["gone.tif"], "relapse": [0.5]})], ignore_index=True)
    fmt.to_csv(data / "submission_format.csv", index=False)
    meta = pd.read_csv(data / "test_metadata.csv")
    meta[meta.filename != "te2.tif"].to_csv(data / "test_metadata.csv", index=False)  # te2 has no metadata row
    sub = vm.run(data, trained.assets, tmp_path / "submission.csv", device="cpu")
    vm.validate_submission(pd.read_csv(tmp_path / "submission.csv"), fmt)
    report = {e["filename"]: e for e in json.loads((tmp_path / "submission_report.json").read_text())["slides"]}
    assert report["te0.tif"]["status"] == "ok" and report["te2.tif"]["status"] == "ok"
    assert report["te2.tif"]["note"] == "no metadata row: slide-only prediction"
    assert report["te1.tif"]["status"] == "failed" and "te1.tif" in report["te1.tif"]["reason"]
    assert report["gone.tif"]["status"] == "failed" and "gone.tif" in report["gone.tif"]["reason"]
    fallback = float(np.clip(trained.model.prior, 1e-3, 1 - 1e-3))
    got = dict(zip(sub.filename, sub.relapse))
    assert got["te1.tif"] == got["gone.tif"] == fallback


def test_metadata_missing_a_column_falls_back_to_the_slides(trained, tmp_path):
    data = _data_dir(trained, tmp_path / "data", names=["te0.tif", "te1.tif"])
    pd.read_csv(data / "test_metadata.csv").drop(columns="body_site").to_csv(data / "test_metadata.csv", index=False)
    vm.run(data, trained.assets, tmp_path / "s.csv", device="cpu")
    report = json.loads((tmp_path / "s_report.json").read_text())
    assert any("['body_site'] missing" in n for n in report["notes"])
    assert [e["status"] for e in report["slides"]] == ["ok", "ok"]


def test_runner_bad_input_errors(trained, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="submission_format.csv does not exist"):
        vm.run(tmp_path, trained.assets, tmp_path / "s.csv")
    # the command prints one clear line and exits with status 2
    with pytest.raises(SystemExit) as exit_info:
        vm.main(["--data-dir", str(tmp_path), "--assets", str(trained.assets), "--output", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 2
    assert "submission_format.csv does not exist" in caplog.text
    pd.DataFrame({"name": ["a.tif"], "relapse": [0.5]}).to_csv(tmp_path / "submission_format.csv", index=False)
    with pytest.raises(ValueError, match="submission_format.csv must have columns 'filename'"):
        vm.run(tmp_path, trained.assets, tmp_path / "s.csv")
    pd.DataFrame({"filename": ["a.tif"], "relapse": [0.5]}).to_csv(tmp_path / "submission_format.csv", index=False)
    with pytest.raises(FileNotFoundError, match="visiomel_model.yaml does not exist"):
        vm.run(tmp_path, tmp_path / "no_assets", tmp_path / "s.csv")


def test_time_budget_is_met_by_sampling_tiles(trained, tmp_path, monkeypatch):
    """A fake clock: each embedded tile costs 10 ms. The budget allows about half the tiles."""
    data = _data_dir(trained, tmp_path / "data", names=[f"te{i}.tif" for i in range(6)])
    clock = [0.0]
    real_embed = vm.embed_tiles

    def embed(path, grid, *a, **k):
        clock[0] += 0.01 * len(grid)
        return real_embed(path, grid, *a, **k)

    monkeypatch.setattr(vm, "embed_tiles", embed)
    monkeypatch.setattr(vm, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    vm.run(data, trained.assets, tmp_path / "full.csv", device="cpu", time_budget=1e6)
    full_entries = json.loads((tmp_path / "full_report.json").read_text())["slides"]
    full_tiles = [e["tiles"] for e in full_entries]
    assert not any(e["sampled"] for e in full_entries)
    assert clock[0] == pytest.approx(0.01 * sum(full_tiles))
    budget = 0.5 * clock[0]
    clock[0] = 0.0
    vm.run(data, trained.assets, tmp_path / "fast.csv", device="cpu", time_budget=budget, min_tiles=2)
    entries = json.loads((tmp_path / "fast_report.json").read_text())["slides"]
    assert clock[0] <= budget, (entries, full_tiles, budget)
    assert [e["status"] for e in entries] == ["ok"] * 6, (entries, full_tiles, budget)
    assert entries[0]["tiles"] == full_tiles[0] and not entries[0]["sampled"]  # the first slide measures the pace
    assert all(e["sampled"] for e in entries[1:]) and sum(e["tiles"] for e in entries) < 0.6 * sum(full_tiles)
    # no time left at all: every slide gets the fallback and the file is still valid
    clock[0] = 0.0
    sub = vm.run(data, trained.assets, tmp_path / "none.csv", device="cpu", time_budget=0)
    assert (sub.relapse == float(np.clip(trained.model.prior, 1e-3, 1 - 1e-3))).all()
    vm.validate_submission(pd.read_csv(tmp_path / "none.csv"), data / "submission_format.csv")
    assert {e["status"] for e in json.loads((tmp_path / "none_report.json").read_text())["slides"]} == {"skipped"}


def test_slide_source_bad_tables(trained, tmp_path):
    """A label CSV missing a column, or listing a slide that is not there / has no tissue."""
    from medmeta.adapters.slides.dataset import SlideTaskSource
    from medmeta.adapters.slides.errors import NoTissueError, SlideOpenError

    backbone = trained.model.backbone
    csv = tmp_path / "labels.csv"
    trained.test_table[["filename", "age"]].to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"labels.csv: column\(s\) \['relapse'\] missing"):
        SlideTaskSource(csv, trained.root / "test_slides", "relapse", backbone, tmp_path / "c")
    make_synthetic_slide(tmp_path / "empty.tif", blobs=0, **{k: v for k, v in SLIDE.items() if k != "blobs"})
    import shutil

    for name in ("te0.tif", "te1.tif"):
        shutil.copy2(trained.root / "test_slides" / name, tmp_path / name)
    table = pd.DataFrame({"filename": ["te0.tif", "gone.tif", "empty.tif", "te1.tif"], "relapse": [0, 1, 0, 1]})
    with pytest.raises(SlideOpenError, match="gone.tif: listed in the label table but the file does not exist"):
        SlideTaskSource(table, tmp_path, "relapse", backbone, tmp_path / "c", tiling=TILING, device="cpu")
    with pytest.raises(NoTissueError, match="empty.tif"):
        SlideTaskSource(table.drop(index=1), tmp_path, "relapse", backbone, tmp_path / "c", tiling=TILING, device="cpu")
    source = SlideTaskSource(table, tmp_path, "relapse", backbone, tmp_path / "c", tiling=TILING, device="cpu",
                             on_error="skip")
    assert source.filenames == ["te0.tif", "te1.tif"] and source.image_indices.tolist() == [0, 3]
    assert sorted(source.failures) == ["empty.tif", "gone.tif"] and "no tissue" in source.failures["empty.tif"]
