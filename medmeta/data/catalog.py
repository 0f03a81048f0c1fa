"""The catalogue of the real MedIMeta 1.0: its 19 ``info.yaml`` files, shipped with medmeta.

They let a user list the real datasets, domains and tasks, and plan held-out targets (which
datasets ``domain_overlaps`` / ``subject_overlaps`` remove), before downloading any image.
"""
from __future__ import annotations

from pathlib import Path

from medmeta.data.info import DatasetInfo

CATALOG_DIR = Path(__file__).resolve().parent / "medimeta_info"
"""Folder of the shipped ``<dataset id>.yaml`` files."""


def medimeta_catalog() -> dict[str, DatasetInfo]:
    """The parsed ``info.yaml`` of every MedIMeta 1.0 dataset, by dataset id (no images)."""
    infos = [DatasetInfo.from_yaml(path) for path in sorted(CATALOG_DIR.glob("*.yaml"))]
    return {info.id: info for info in infos}
