"""The API reference site: ``mkdocs build --strict`` passes and renders the docstrings.

The build generates its pages from the tree (docs/gen_pages.py), so this also checks that every
public module's docstrings parse without warnings and that every cross-reference resolves.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_gen_files", "mkdocs_literate_nav", "jupytext")


def _missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def _load_extension():
    pytest.importorskip("griffe", reason="the docs extra is not installed (pip install -e '.[docs]')")
    spec = importlib.util.spec_from_file_location("griffe_grouped_args", ROOT / "docs" / "griffe_grouped_args.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page_text(path: Path) -> str:
    """The visible text of a built page, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))
    return " ".join(text.split())


def _docstring_first_line(module: str) -> str:
    """The first docstring line of a medmeta module, read from its source, as the page shows it."""
    parts = module.split(".")
    path = ROOT.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = ROOT.joinpath(*parts, "__init__.py")
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{module} has no module docstring"
    first = docstring.strip().splitlines()[0]
    return " ".join(first.replace("`", "").split())


def test_grouped_args_are_split_per_parameter() -> None:
    ext = _load_extension()
    doc = (
        "Summary.\n\nArgs:\n    root: the root.\n    images / masks: arrays,\n        one per case.\n"
        "    rank, world_size (int): process.\n\nReturns:\n    a, b: untouched outside argument sections.\n"
    )
    assert ext.split_grouped_args(doc) == (
        "Summary.\n\nArgs:\n    root: the root.\n    images: arrays,\n        one per case.\n"
        "    masks: arrays,\n        one per case.\n    rank (int): process.\n    world_size (int): process.\n"
        "\nReturns:\n    a, b: untouched outside argument sections."
    )


def test_sphinx_roles_become_links_or_code() -> None:
    ext = _load_extension()
    text = (
        "See :class:`~medmeta.data.MetaDataset`, :func:`medmeta.io.load`, :mod:`~.reader`, "
        ":meth:`Foo.bar`, :func:`torch.func.vmap` and :func:`the loader <medmeta.io.load>`."
    )
    assert ext.sphinx_roles_to_markdown(text) == (
        "See [`MetaDataset`][medmeta.data.MetaDataset], [`medmeta.io.load`][medmeta.io.load], `reader`, "
        "`Foo.bar`, `torch.func.vmap` and [`the loader`][medmeta.io.load]."
    )


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}; pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"

    for module in ("medmeta.learners.protonet", "medmeta.data.meta_dataset"):
        page = site.joinpath("reference", *module.split("."), "index.html")
        assert page.is_file(), f"no API page for {module}"
        text = _page_text(page)
        assert module in text
        assert _docstring_first_line(module) in text, f"{module}'s docstring is not on its page"

    # A package page links what it exports to the page that documents it.
    learners = (site / "reference" / "medmeta" / "learners" / "index.html").read_text(encoding="utf-8")
    assert 'href="protonet/#medmeta.learners.protonet.ProtoNet"' in learners

    # The README is the home page; its links to the guides point at the guides' pages.
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Cross-domain few-shot learning for medical imaging" in _page_text(site / "index.html")
    assert 'href="experiments/"' in home
    # Every jupytext notebook is rendered (markdown cells as text, code as code; not executed).
    notebooks = [p for p in (ROOT / "notebooks").glob("*.py") if "format_name: percent" in p.read_text()[:2000]]
    assert notebooks
    for notebook in notebooks:
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), notebook.name
