"""Helpers of the notebook tests: run a Jupytext percent-format notebook headless (nbclient +
ipykernel) in quick mode, check figures, read outputs."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def execute_notebook(path: Path, workdir: Path, timeout: int = 300, quick: bool = True) -> tuple[object, Path, float]:
    """Convert ``path`` to a notebook, execute every cell in a fresh kernel in ``workdir``.

    The kernel gets ``MEDMETA_NOTEBOOK_QUICK=1`` and ``MEDMETA_NOTEBOOK_OUT=<workdir>/outputs``;
    a cell that raises fails the call with nbclient's ``CellExecutionError`` (cell source and
    traceback). Returns the executed notebook, the output folder and the seconds it took.
    """
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    if not path.is_file():
        pytest.fail(f"notebook {path} is missing")
    nb = jupytext.read(path)
    out = workdir / "outputs"
    saved = {k: os.environ.get(k) for k in ("MEDMETA_NOTEBOOK_QUICK", "MEDMETA_NOTEBOOK_OUT", "MPLBACKEND")}
    os.environ["MEDMETA_NOTEBOOK_QUICK"] = "1" if quick else "0"
    os.environ["MEDMETA_NOTEBOOK_OUT"] = str(out)
    os.environ["MPLBACKEND"] = "Agg"
    start = time.perf_counter()
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        )
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        nbformat.write(nb, workdir / (path.stem + ".ipynb"))  # executed copy, for inspection
    return nb, out, time.perf_counter() - start


def check_png(path: Path, min_side: int = 200) -> None:
    """``path`` is a readable PNG of a real figure: big enough, many colours, not blank."""
    from PIL import Image

    assert path.is_file(), f"figure {path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG", f"{path} is {img.format}, expected PNG"
        rgb = np.asarray(img.convert("RGB"))
    h, w = rgb.shape[:2]
    assert min(h, w) >= min_side, f"{path} is only {w}x{h} pixels"
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colours >= 50, f"{path} has {colours} distinct colours: not a real plot"
    ink = (rgb.astype(np.int16).sum(axis=2) < 600).mean()  # share of non-white pixels
    assert ink > 0.02, f"{path} is almost blank ({100 * ink:.1f}% non-white pixels)"


def cell_errors(nb: object) -> list[str]:
    """Error outputs left in an executed notebook (nbclient raises on the first; belt and braces)."""
    errors = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                errors.append(f"{output.get('ename')}: {output.get('evalue')}")
    return errors


def notebook_text(nb: object) -> str:
    """All stream and text outputs of an executed notebook."""
    parts = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "\n".join(parts)
