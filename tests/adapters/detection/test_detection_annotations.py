"""Challenge annotation and submission files: reading, validation errors, atomic writing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medmeta.adapters.slides.detection.annotations import (
    AnnotationError,
    SlideAnnotation,
    assign_to_rois,
    read_annotation,
    read_annotation_folder,
    read_predictions,
    read_submission,
    write_annotation,
    write_predictions,
    xywh_to_xyxy,
    xyxy_to_xywh,
)

# the organisers' example (seed 004)
EXAMPLE = [
    {"x": 33842, "y": 31905, "w": 101, "h": 106, "class": "pos"},
    {"x": 31755, "y": 31016, "w": 4728, "h": 3696, "class": "roi"},
    {"x": 32770, "y": 34121, "w": 84, "h": 71, "class": "pos"},
    {"x": 13991, "y": 38929, "w": 131, "h": 115, "class": "pos"},
    {"x": 9598, "y": 35063, "w": 5247, "h": 5407, "class": "roi"},
    {"x": 25030, "y": 40115, "w": 250, "h": 173, "class": "pos"},
]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_reads_the_organisers_example(tmp_path):
    ann = read_annotation(_write(tmp_path / "20160050033533_ano.json", EXAMPLE), slide_size=(60000, 60000))
    assert ann.slide_id == "20160050033533_ano"
    np.testing.assert_array_equal(ann.rois, [[31755, 31016, 4728, 3696], [9598, 35063, 5247, 5407]])
    assert ann.cells.shape == (4, 4)
    by_roi = ann.cells_by_roi()
    # ROI 0 holds the cells at (33842, 31905) and (32770, 34121); ROI 1 the one at (13991, 38929);
    # the cell at (25030, 40115) lies in no ROI (as the challenge's example has it)
    assert [list(i) for i in by_roi] == [[0, 1], [2]]
    assert not ann.is_negative


def test_roundtrip_and_empty_negative(tmp_path):
    ann = SlideAnnotation("s", [[0, 0, 100, 100]], [[10.5, 10, 20, 20]])
    p = write_annotation(tmp_path / "s.json", ann)
    back = read_annotation(p)
    np.testing.assert_array_equal(back.rois, ann.rois)
    np.testing.assert_array_equal(back.cells, ann.cells)
    neg = read_annotation(_write(tmp_path / "neg.json", []))
    assert neg.is_negative and neg.rois.shape == (0, 4)
    assert sorted(read_annotation_folder(tmp_path)) == ["neg", "s"]


@pytest.mark.parametrize(
    "content, match",
    [
        ({"x": 1}, "expected a JSON list of boxes, got a JSON dict"),
        ([{"x": 1, "y": 2, "w": 3, "h": 4, "class": "pos"}, {"x": 1, "y": 2, "w": -3, "h": 4, "class": "pos"}],
         r"entry 1: box size must be positive, got w=-3"),
        ([{"x": 1, "y": 2, "w": 3, "h": 4, "class": "hsil"}], r"entry 0: unknown class 'hsil'"),
        ([{"x": 1, "y": 2, "w": 3, "class": "pos"}], r"entry 0: missing field\(s\) \['h'\]"),
        ([{"x": "1", "y": 2, "w": 3, "h": 4, "class": "pos"}], r"entry 0: field 'x' must be a finite number"),
        ([{"x": -5, "y": 2, "w": 3, "h": 4, "class": "roi"}], r"entry 0: box corner must be non-negative"),
        ([{"x": 990, "y": 2, "w": 30, "h": 4, "class": "pos"}], r"entry 0: .*extends outside the slide of size 1000 x 1000"),
        ([[1, 2, 3, 4]], r"entry 0: expected an object"),
    ],
)
def test_validation_errors_name_file_and_entry(tmp_path, content, match):
    path = _write(tmp_path / "slide7.json", content)
    with pytest.raises(AnnotationError, match=match) as info:
        read_annotation(path, slide_size=(1000, 1000))
    assert "slide7.json" in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{'x': 1}]")
    with pytest.raises(AnnotationError, match="bad.json: not valid JSON"):
        read_annotation(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_annotation(tmp_path / "nope.json")


def test_cells_outside_rois_can_be_required(tmp_path):
    path = _write(tmp_path / "s.json", EXAMPLE)
    with pytest.raises(AnnotationError, match=r"s.json: entry 5: pos box centre lies in no ROI"):
        read_annotation(path, require_cells_in_rois=True)


def test_write_predictions_atomic_and_readable(tmp_path):
    boxes = np.array([[22890.26, 3877, 396, 255], [26583, 7937, 172.04, 128]])
    p = write_predictions(tmp_path / "sub", "20160050033533_ano", boxes, [0.94135, 0.73228])
    assert p.name == "20160050033533_ano.json"
    assert [q.name for q in (tmp_path / "sub").iterdir()] == ["20160050033533_ano.json"]  # no temp file left
    rec = json.loads(p.read_text())
    assert set(rec[0]) == {"x", "y", "w", "h", "p"} and rec[0]["p"] == 0.94135
    b, s = read_predictions(p)
    np.testing.assert_allclose(b, np.round(boxes, 1))
    np.testing.assert_allclose(s, [0.94135, 0.73228])
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        write_predictions(tmp_path / "sub", "x", boxes, [0.5])


def test_prediction_errors(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "a.json", [{"x": 1, "y": 2, "w": 3, "h": 4, "p": 0.5}])
    _write(sub / "ghost.json", [])
    with pytest.raises(AnnotationError, match=r"ghost.json names slide 'ghost', which is not among the 2 slides"):
        read_submission(sub, ["a", "b"])
    (sub / "ghost.json").unlink()
    out = read_submission(sub, ["a", "b"])
    assert out["b"][0].shape == (0, 4)  # a slide without a file predicts nothing
    with pytest.raises(FileNotFoundError, match="no prediction file b.json"):
        read_submission(sub, ["a", "b"], allow_missing=False)
    _write(sub / "a.json", [{"x": 1, "y": 2, "w": 3, "h": 4, "p": None}])
    with pytest.raises(AnnotationError, match=r"a.json: entry 0: field 'p' must be a finite number"):
        read_submission(sub, ["a"])


def test_box_conversions_and_roi_assignment():
    b = np.array([[10, 20, 30, 40]], float)
    np.testing.assert_array_equal(xywh_to_xyxy(b), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(xyxy_to_xywh(xywh_to_xyxy(b)), b)
    rois = np.array([[0, 0, 50, 50], [0, 0, 30, 30]], float)
    cells = np.array([[10, 10, 10, 10], [35, 35, 20, 20]], float)  # second: centre (45, 45), pokes out
    assert [list(i) for i in assign_to_rois(cells, rois, "center")] == [[0, 1], [0]]
    assert [list(i) for i in assign_to_rois(cells, rois, "inside")] == [[0], [0]]


def test_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from medmeta.adapters.slides.detection.cli import main

    sub, anns = tmp_path / "sub", tmp_path / "anns"
    sub.mkdir()
    anns.mkdir()
    _write(anns / "a.json", [{"x": 0, "y": 0, "w": 100, "h": 100, "class": "roi"}])
    _write(sub / "ghost.json", [{"x": 1, "y": 2, "w": 3, "h": 4, "p": 0.5}])
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--submission", str(sub), "--annotations", str(anns)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("medmeta-detect score: error: ") and "ghost.json" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(tmp_path / "d.pt"), "--slides", str(tmp_path / "none"),
              "--out", str(sub)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "detector checkpoint" in err and "d.pt does not exist" in err
