"""Fixtures of the notebook tests (helpers live in nb_harness.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory: pytest.TempPathFactory):
    """``MEDMETA_DATA_DIR`` set to a session folder (kernels inherit it), the embedded real-image
    meta-dataset built there once for every notebook that opens it."""
    from medmeta.recipes import open_default

    data_dir = tmp_path_factory.mktemp("medmeta_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDMETA_DATA_DIR", str(data_dir))
        meta = open_default("real")
        assert len(meta.tasks) > 0
        yield meta
