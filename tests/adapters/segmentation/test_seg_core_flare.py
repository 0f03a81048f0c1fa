"""The FLARE-style runner on synthetic CT: masks with the input geometry, scores, efficiency report."""
from __future__ import annotations

import runpy
import shutil
import sys
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medmeta.adapters.segmentation.flare import _pick_slices, list_cases, main, pair_cases, run_flare
from medmeta.adapters.segmentation.metrics import dice
from medmeta.adapters.segmentation.volumes import write_volume
from medmeta.errors import DataFormatError


def test_runner_writes_masks_with_input_geometry_and_report(synthetic_ct_dir, tmp_path, intensity_learner):
    pairs = pair_cases(synthetic_ct_dir / "images", synthetic_ct_dir / "labels")
    out = tmp_path / "pred"
    table = run_flare(
        synthetic_ct_dir / "images", out, intensity_learner, pairs[:1], batch_size=5,
        labels_dir=synthetic_ct_dir / "labels", report_dir=tmp_path / "report", method="intensity",
    )
    assert intensity_learner.adapt_calls == 1
    assert sorted(p.name for p in out.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    for image_path, label_path in pairs:
        image = nib.load(str(image_path))
        pred = nib.load(str(out / label_path.name))
        assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, image.affine)
        assert pred.header.get_zooms() == image.header.get_zooms()
        assert int(pred.header["sform_code"]) == int(image.header["sform_code"])
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3, 4}
    assert table["case"].tolist() == ["setup", "case_000", "case_001", "case_002", "overall"]
    case = table.set_index("case")
    assert (case.loc["case_000":"case_002", "seconds"] > 0).all()
    assert (case.loc["case_000":"case_002", "peak_rss_mb"] > 0).all()
    assert case.loc["setup", "slices"] > 0 and case.loc["case_001", "slices"] == 16
    # the scores in the report are those of the written masks
    gt = np.asarray(nib.load(str(pairs[2][1])).dataobj)
    written = np.asarray(nib.load(str(out / "case_002.nii.gz")).dataobj)
    assert case.loc["case_002", "dice_liver"] == pytest.approx(dice(written == 1, gt == 1))
    # the intensity model separates the bright kidneys and the large liver on held-out cases
    assert case.loc["case_002", "dice_kidney"] > 0.7 and case.loc["case_002", "dice_liver"] > 0.5
    assert 0 <= case.loc["overall", "nsd_mean"] <= 1
    report = pd.read_csv(tmp_path / "report" / "efficiency.csv")
    assert report["case"].tolist()[-1] == "overall"
    assert "| case_001 | intensity | cpu |" in (tmp_path / "report" / "efficiency.md").read_text()


def test_cli_with_a_segmentation_head(synthetic_ct_dir, tmp_path, capsys):
    pytest.importorskip("medmeta.adapters.segmentation.heads", reason="needs the segmentation heads")
    rc = main([
        "--input", str(synthetic_ct_dir / "images"), "--output", str(tmp_path / "out"),
        "--support-images", str(synthetic_ct_dir / "images"), "--support-labels", str(synthetic_ct_dir / "labels"),
        "--support-cases", "1", "--shots", "3", "--method", "prototype", "--backbone", "medmeta_conv4_tiny",
        "--labels-dir", str(synthetic_ct_dir / "labels"), "--device", "cpu", "--batch-size", "0", "--hd95",
    ])
    assert rc == 0, capsys.readouterr().err
    assert "3 cases" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "efficiency.csv")
    assert table["method"].iloc[0] == "prototype" and table["slices"].iloc[0] == 3  # 3 annotated shots
    assert {"dice_pancreas", "nsd_pancreas", "hd95_pancreas"} <= set(table.columns)
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 3


def test_support_shots_cover_every_label():
    presence = np.zeros((10, 3), dtype=np.uint8)
    presence[:, 0] = 1
    presence[8:, 1] = 1  # label 2 only in the last two slices
    presence[2, 2] = 1  # label 3 in one slice
    picked = _pick_slices(np.arange(100, 110), presence, 3)
    assert picked.tolist() == [102, 105, 109]  # central slice of each label
    assert _pick_slices(np.arange(100, 110), presence, 5).tolist() == [100, 102, 104, 105, 109]
    assert len(_pick_slices(np.arange(100, 110), presence, 1)) == 3  # coverage wins over k


def _exit_status(argv: list[str], learner) -> object:
    """``main``'s exit status, whether it returns it or exits with it (``SystemExit``)."""
    try:
        return main(argv, learner=learner)
    except SystemExit as exit_info:
        return exit_info.code


def test_bad_inputs_give_clear_errors(synthetic_ct_dir, tmp_path, intensity_learner, capsys):
    inputs = tmp_path / "inputs"
    shutil.copytree(synthetic_ct_dir / "images", inputs)
    (inputs / "readme.txt").write_text("not a volume")
    with pytest.raises(DataFormatError, match="readme.txt: not a NIfTI file"):
        list_cases(inputs)
    args = ["--input", str(inputs), "--output", str(tmp_path / "out"), "--support-images",
            str(synthetic_ct_dir / "images"), "--support-labels", str(synthetic_ct_dir / "labels")]
    assert _exit_status(args, intensity_learner) == 2
    assert "readme.txt: not a NIfTI file" in capsys.readouterr().err
    # a support label whose shape differs from its image
    labels = tmp_path / "labels"
    labels.mkdir()
    for src in (synthetic_ct_dir / "labels").iterdir():
        shutil.copy(src, labels / src.name)
    image = nib.load(str(synthetic_ct_dir / "images" / "case_000_0000.nii.gz"))
    write_volume(labels / "case_000.nii.gz", np.zeros((40, 40, 15), np.uint8), image.affine)
    args = ["--input", str(synthetic_ct_dir / "images"), "--output", str(tmp_path / "out"), "--support-images",
            str(synthetic_ct_dir / "images"), "--support-labels", str(labels)]
    assert _exit_status(args, intensity_learner) == 2
    err = capsys.readouterr().err
    assert "case_000.nii.gz: label shape (40, 40, 15) differs from image shape (40, 40, 16)" in err
    (labels / "case_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_001_0000.nii.gz: no label volume case_001.nii.gz"):
        pair_cases(synthetic_ct_dir / "images", labels)


def test_module_entry_point_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["medmeta-flare", "--help"])
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        runpy.run_module("medmeta.adapters.segmentation.flare", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "medmeta-flare" in out and "--support-images" in out
