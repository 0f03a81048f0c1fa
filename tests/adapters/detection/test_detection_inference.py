"""Slide inference: tiles cover the slide (edges included), tissue filtering, merging across tile borders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medmeta.adapters.slides.detection.annotations import read_predictions
from medmeta.adapters.slides.detection.inference import detect_slide, detection_grid, run_inference, slide_id_of
from medmeta.adapters.slides.reader import open_slide
from medmeta.adapters.slides.synthetic import write_pyramidal_tiff


class DarkBlobDetector(nn.Module):
    """A stand-in detector with a known answer: one box per connected dark region of each tile.

    Scores are random, or with ``favour_fragments`` decrease with the box area, so that a box cut
    by a tile edge always outscores the whole box and wins NMS unless the merging drops it.
    """

    def __init__(self, favour_fragments: bool = False) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.favour_fragments = favour_fragments

    def forward(self, images):
        out = []
        for im in images:
            self.calls += 1
            lab, n = ndimage.label((im.mean(0) < 0.5).numpy())
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            scores = (0.9 - ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / 1000 if self.favour_fragments
                      else 0.5 + 0.4 * torch.rand(len(b)))
            out.append({"boxes": b, "scores": scores, "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


# squares (x, y, size): across vertical, horizontal and corner tile borders, and in the right/bottom strips
SQUARES = [(30, 30, 12), (58, 20, 14), (20, 95, 16), (95, 97, 15), (188, 60, 10), (150, 187, 11), (186, 186, 12)]


@pytest.fixture(scope="module")
def square_slide(tmp_path_factory):
    img = np.full((200, 200, 3), 240, dtype=np.uint8)
    for x, y, s in SQUARES:
        img[y:y + s, x:x + s] = 30
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("sq") / "squares.tif", img, tile=64, compression="zlib")
    truth = np.array([[x, y, x + s, y + s] for x, y, s in SQUARES], dtype=float)
    return path, truth


def _sorted(b):
    return b[np.lexsort((b[:, 1], b[:, 0]))]


def test_grid_covers_the_whole_slide_including_edge_strips(square_slide):
    slide = open_slide(square_slide[0])
    grid = detection_grid(slide, tile_size=64, overlap=24, min_tissue=0)
    cover = np.zeros((200, 200), bool)
    for x, y in grid.coords:
        cover[y:y + 64, x:x + 64] = True
    assert cover.all()
    assert {136} <= set(grid.coords[:, 0].tolist())  # the flush right-edge column (200 - 64)
    assert grid.stride == 40


def test_boxes_are_merged_across_tile_borders(square_slide):
    path, truth = square_slide
    torch.manual_seed(0)
    det = detect_slide(DarkBlobDetector(), path, tile_size=64, overlap=24, min_tissue=0, batch_size=5)
    np.testing.assert_array_equal(_sorted(det.boxes), _sorted(truth))
    assert det.n_tiles == 25 and det.seconds > 0 and set(det.timings) == {"tiling", "reading", "model", "postprocess"}
    # without dropping boxes cut by tile edges, the fragments survive NMS (their IoU with the whole box is low)
    det2 = detect_slide(DarkBlobDetector(), path, tile_size=64, overlap=24, min_tissue=0, drop_cut_boxes=False)
    assert len(det2.boxes) > len(truth)
    # NMS alone merges what overlapping tiles both see whole
    assert len(det2.boxes) < sum(1 for _ in range(det2.n_tiles)) * len(truth)


def test_tissue_filtering_reads_fewer_tiles_and_keeps_the_cells(tmp_path):
    from medmeta.adapters.slides.detection.synthetic_cytology import write_synthetic_cytology_slide

    f = write_synthetic_cytology_slide(tmp_path, "smear", size=(1024, 1024), seed=5, smear_fraction=0.3,
                                       roi_size=(160, 160))
    slide = open_slide(f.slide_path)
    full = detection_grid(slide, tile_size=128, overlap=32, min_tissue=0)
    tissue = detection_grid(slide, tile_size=128, overlap=32)
    assert len(tissue.coords) < 0.6 * len(full.coords)
    cells = np.concatenate([f.truth.abnormal, f.truth.normal])
    for x, y, w, h in cells:  # every cell lies whole in a kept tile
        inside = ((tissue.coords[:, 0] <= x) & (tissue.coords[:, 1] <= y)
                  & (tissue.coords[:, 0] + 128 >= x + w) & (tissue.coords[:, 1] + 128 >= y + h))
        assert inside.any(), (x, y, w, h)


def test_cut_boxes_are_dropped_even_when_they_outscore_the_whole_box(square_slide):
    """Regression: a square 2 px from the right slide edge, cut by an inner bottom tile edge.

    The neighbour below holds it whole; its right edge lies on the slide border, which must not
    count as a cut (it used to, so the fragment was kept and won NMS whenever it scored higher).
    """
    path, truth = square_slide
    for overlap in (24, 48):  # 48: stride 16, a box's whole copy may be held four tiles away
        det = detect_slide(DarkBlobDetector(favour_fragments=True), path, tile_size=64, overlap=overlap, min_tissue=0)
        np.testing.assert_array_equal(_sorted(det.boxes), _sorted(truth))
    for bs in (1, 3, 8):  # batching changes nothing
        det_b = detect_slide(DarkBlobDetector(favour_fragments=True), path, tile_size=64, overlap=24,
                             min_tissue=0, batch_size=bs)
        np.testing.assert_array_equal(_sorted(det_b.boxes), _sorted(truth))


def test_run_inference_writes_one_file_per_slide(square_slide, tmp_path):
    path, truth = square_slide
    torch.manual_seed(0)
    res = run_inference(DarkBlobDetector(), [path], tmp_path / "sub", log_fn=None, tile_size=64, overlap=24, min_tissue=0)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["squares.json"]
    boxes, scores = read_predictions(tmp_path / "sub" / "squares.json")
    np.testing.assert_allclose(_sorted(boxes), _sorted(np.c_[truth[:, :2], truth[:, 2:] - truth[:, :2]]))
    assert len(scores) == len(truth) and res[0].summary()["n_cells"] == len(truth)
    with pytest.raises(ValueError, match="share the id"):
        run_inference(DarkBlobDetector(), [path, path], tmp_path / "sub2", log_fn=None)
    missing = tmp_path / "missing.tif"
    with pytest.raises(ValueError, match="missing.tif"):
        run_inference(DarkBlobDetector(), [missing], tmp_path / "sub3", log_fn=None)
    assert run_inference(DarkBlobDetector(), [missing], tmp_path / "sub3", log_fn=None, on_error="skip") == []


def test_slide_ids():
    assert slide_id_of("/a/20160050033533_ano.tif") == "20160050033533_ano"
    assert slide_id_of("x/slide.ome.tiff") == "slide"
    assert slide_id_of("b.kfb") == "b"
