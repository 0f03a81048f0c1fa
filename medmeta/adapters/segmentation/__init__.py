"""Few-shot segmentation of 2-D images and 3-D volumes (optional extra: ``pip install 'medmeta[seg]'``).

* :mod:`~.volumes`: NIfTI reading/writing with spacing (nibabel), CT windowing, slicing, slice-wise
  and sliding-window inference.
* :mod:`~.slices`: 2-D segmentation sets in the MedIMeta layout (``masks`` beside ``images`` in
  HDF5), slices of volumes as a task source, few-shot segmentation episodes.
* :mod:`~.synthetic_ct`: seeded synthetic abdominal CT with the four FLARE labels.
* :mod:`~.metrics`: Dice, normalised surface Dice and HD95 with voxel spacing.
* :mod:`~.efficiency`: time and memory per case, report tables, FLARE's rank-then-aggregate.
* :mod:`~.flare`: the FLARE-style runner (``medmeta-flare``).
* :mod:`~.heads`: prototype, linear-probe and U-Net segmentation heads (``create_segmenter``).
* :mod:`~.real_data`: segmentation images that installed packages ship.

Names are imported lazily, so ``import medmeta.adapters.segmentation`` loads neither nibabel nor
the heads.
"""
from __future__ import annotations

from medmeta.registry import lazy_exports

_EXPORTS = {
    # volumes
    "Volume": "volumes",
    "CT_WINDOWS": "volumes",
    "read_volume": "volumes",
    "read_image_and_label": "volumes",
    "write_volume": "volumes",
    "window_ct": "volumes",
    "to_slices": "volumes",
    "from_slices": "volumes",
    "sliding_window_2d": "volumes",
    "predict_volume": "volumes",
    "case_name": "volumes",
    # slices
    "MASKS_DATASET": "slices",
    "write_segmentation_set": "slices",
    "SegmentationTaskSource": "slices",
    "VolumeSliceSource": "slices",
    "SegmentationEpisodeSampler": "slices",
    "prepare_slices": "slices",
    "remap_mask": "slices",
    # synthetic CT
    "FLARE_LABELS": "synthetic_ct",
    "make_synthetic_ct": "synthetic_ct",
    "write_synthetic_ct_cases": "synthetic_ct",
    # metrics
    "dice": "metrics",
    "normalized_surface_dice": "metrics",
    "hausdorff_distance": "metrics",
    "surface_distances": "metrics",
    "segmentation_scores": "metrics",
    # efficiency
    "CaseEfficiency": "efficiency",
    "MemorySampler": "efficiency",
    "measure_case": "efficiency",
    "EfficiencyMonitor": "efficiency",
    "efficiency_table": "efficiency",
    "write_efficiency_report": "efficiency",
    "flare_ranking": "efficiency",
    # runner
    "run_flare": "flare",
    # heads (seg_heads)
    "create_segmenter": "heads",
    "register_segmenter": "heads",
    "list_segmenters": "heads",
    "PrototypeSegmenter": "heads",
    "LinearProbeSegmenter": "heads",
    "UNetSegmenter": "heads",
    # bundled real images (seg_heads)
    "nuclei_2d": "real_data",
    "nuclei_3d": "real_data",
    "mni152_volume": "real_data",
    "mni152_slices": "real_data",
    "shepp_logan_2d": "real_data",
    "tile_image": "real_data",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
