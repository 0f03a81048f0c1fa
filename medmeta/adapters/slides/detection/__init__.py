"""Cell detection in cytology slides, scored as the Tianchi cervical cytology challenge scores it.

The 2019 Tianchi "Digital Human" challenge (cervical cancer risk diagnosis) asks for boxes around
abnormal squamous cells in 20x liquid-based cytology slides, scored by AP at IoU 0.5 and 0.7
inside annotated ROIs. Its slides came in the vendor's ``.kfb`` format; medmeta works on slides
converted to TIFF/SVS (the slide reader opens ``.kfb`` through the optional ``kfbslide`` backend).

Modules (one concept each):

* :mod:`.annotations`: read/validate the challenge JSON, map boxes to ROIs, write submissions.
* :mod:`.metric`: the challenge score (ROIs as images, greedy matching, all-point AP).
* :mod:`.patches`: training patches around annotated cells, cell-free and negative patches.
* :mod:`.detector`: Faster R-CNN / RetinaNet with an FPN over a medmeta (timm) backbone,
  training, few-shot adaptation of the classification head, checkpoints.
* :mod:`.inference`: sliding window over tissue, merging across tiles, submission folders.
* :mod:`.synthetic_cytology`: synthetic cytology slides with known boxes for tests.
* :mod:`.cli`: ``python -m medmeta.adapters.slides.detection {train,predict,score,synthesize}``.

Heavy modules (torch, torchvision, the slide reader) load on first use of their names.
"""
from __future__ import annotations

from medmeta.registry import lazy_exports

_EXPORTS = {
    "AnnotationError": "annotations", "SlideAnnotation": "annotations", "read_annotation": "annotations",
    "read_annotation_folder": "annotations", "write_annotation": "annotations", "read_predictions": "annotations",
    "read_submission": "annotations", "write_predictions": "annotations", "boxes_in_roi": "annotations",
    "assign_to_rois": "annotations",
    "evaluate_slide": "metric", "evaluate_slides": "metric", "score_submission": "metric",
    "average_precision": "metric", "DetectionScore": "metric", "SlideScore": "metric",
    "PatchSampler": "patches", "DetectionPatchDataset": "patches", "ArraySlide": "patches", "PatchWindow": "patches",
    "DetectorConfig": "detector", "build_detector": "detector", "train_detector": "detector",
    "adapt_classification_head": "detector", "save_detector": "detector", "load_detector": "detector",
    "TimmFPNBackbone": "detector",
    "detect_slide": "inference", "run_inference": "inference", "SlideDetections": "inference",
    "make_cytology_image": "synthetic_cytology", "write_synthetic_cytology_slide": "synthetic_cytology",
    "make_synthetic_cytology_set": "synthetic_cytology",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
