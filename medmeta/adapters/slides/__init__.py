"""Whole-slide pathology images as tiles and bags (optional extra: ``pip install 'medmeta[wsi]'``).

* :mod:`~.reader`: ``open_slide`` with OpenSlide, tifffile (direct tile decoding), pyvips,
  cuCIM and kfbslide backends behind one :class:`SlideReader` interface.
* :mod:`~.tissue`: tissue detection at low resolution, :class:`TissueMask`.
* :mod:`~.tiling`: ``tile_slide`` at a magnification or microns per pixel, :class:`TileGrid`
  (HDF5 ``coords``), :class:`TileDataset` for parallel DataLoader reads.
* :mod:`~.stain`: Macenko stain normalisation.
* :mod:`~.features`, :mod:`~.dataset`, :mod:`~.mil`: cached tile features, slide-level task
  sources of bags, MIL heads (ABMIL, mean/max pooling, CLAM-SB) and their training loop.
* :mod:`~.synthetic`: seeded synthetic pyramidal TIFFs (pages, sub-IFD and Aperio layouts).
* :mod:`~.visiomel`: the VisioMel-style runner, submission template and metric.

Names are imported lazily, so ``import medmeta.adapters.slides`` does not load OpenSlide.
"""
from __future__ import annotations

from medmeta.registry import lazy_exports

_EXPORTS = {
    "open_slide": "reader",
    "SlideReader": "reader",
    "slide_fingerprint": "reader",
    "available_backends": "reader",
    "list_backends": "reader",
    "detect_tissue": "tissue",
    "TissueMask": "tissue",
    "tile_slide": "tiling",
    "TileGrid": "tiling",
    "TileDataset": "tiling",
    "TileTransform": "tiling",
    "read_tile": "tiling",
    "MacenkoNormalizer": "stain",
    "SlideFeatureStore": "features",
    "SlideFeatures": "features",
    "embed_slide": "features",
    "embed_tiles": "features",
    "slide_features": "features",
    "SlideTaskSource": "dataset",
    "sample_slide_episodes": "dataset",
    "Bags": "mil",
    "ABMIL": "mil",
    "PoolMIL": "mil",
    "CLAMSB": "mil",
    "MILLearner": "mil",
    "create_mil_head": "mil",
    "list_mil_heads": "mil",
    "train_mil": "mil",
    "predict_mil": "mil",
    "write_pyramidal_tiff": "synthetic",
    "make_synthetic_slide": "synthetic",
    "SyntheticSlide": "synthetic",
    "visiomel_log_loss": "visiomel",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
