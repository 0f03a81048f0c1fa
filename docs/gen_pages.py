"""Generate the documentation site's pages at build time (run by the mkdocs-gen-files plugin).

Nothing here lists a module, guide or notebook by hand, so pages follow the tree as it changes:

* ``index.md``: the README, included as it is (relative links rewritten to the site's pages);
* guides: every ``docs/*.md`` plus ``benchmarks/README.md``;
* notebooks: ``notebooks/README.md`` and every jupytext percent-format ``notebooks/*.py``, rendered
  as Markdown (text cells as text, code cells as code; nothing is executed);
* API reference: one page per public module of ``medmeta`` (found with :mod:`pkgutil` on the
  source tree) holding ``::: module.name``; mkdocstrings renders it from the docstrings. A
  package's page renders its own docstring and members and links each name it re-exports (its
  ``__all__``, lazy exports included) to the one page that documents it, with its summary line;
* ``SUMMARY.md``: the navigation, read by mkdocs-literate-nav.
"""

from __future__ import annotations

import importlib
import pkgutil
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

import griffe
import jupytext
import mkdocs_gen_files

PACKAGE = "medmeta"
#: Module names (any dotted part) that get no API page: entry-point shims and files that are
#: copied out as templates rather than imported.
SKIPPED_PARTS = frozenset({"__main__", "templates"})

ROOT = Path(mkdocs_gen_files.config.config_file_path).resolve().parent
DOCS_DIR = Path(mkdocs_gen_files.config.docs_dir).resolve()

# A Markdown inline link or image target: ``](target)`` or ``](target "title")``.
_LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")


def public_modules(package_dir: Path, prefix: str) -> Iterator[tuple[str, bool]]:
    """Yield ``(dotted name, is_package)`` for every public module under ``package_dir``, sorted.

    Uses :func:`pkgutil.iter_modules` on the source tree, so optional dependencies of a module
    never decide whether it is documented. Private (``_x``) modules and packages are skipped.
    """
    for info in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in SKIPPED_PARTS:
            continue
        name = f"{prefix}.{info.name}"
        yield name, info.ispkg
        if info.ispkg:
            yield from public_modules(package_dir / info.name, name)


def title_of(markdown: str, fallback: str) -> str:
    """The first level-1 heading of ``markdown``, else ``fallback``."""
    match = re.search(r"^# +(.+?)\s*#*\s*$", markdown, flags=re.MULTILINE)
    return match.group(1) if match else fallback


def rewrite_links(markdown: str, source: str, page: str, site_of: dict[str, str]) -> str:
    """Point relative links of the repository file ``source`` at the site pages that render them.

    ``site_of`` maps repository paths (posix, relative to the root) to site paths. Links to
    anything else are left alone, so ``mkdocs build --strict`` reports them as broken.
    """

    def replace(match: re.Match[str]) -> str:
        target = match.group(2)
        path, sep, anchor = target.partition("#")
        if not path or "://" in path or path.startswith(("/", "mailto:")):
            return match.group(0)
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if repo_path not in site_of:
            return match.group(0)
        new = posixpath.relpath(site_of[repo_path], posixpath.dirname(page) or ".")
        return f"{match.group(1)}{new}{sep}{anchor}{match.group(3)}"

    return _LINK.sub(replace, markdown)


def is_notebook(path: Path) -> bool:
    """Whether ``path`` is a jupytext percent-format notebook (rather than a helper script)."""
    head = path.read_text(encoding="utf-8")[:2000]
    return "format_name: percent" in head


def notebook_markdown(path: Path) -> str:
    """Render a percent-format notebook as Markdown: text cells as text, code cells as Python blocks."""
    notebook = jupytext.read(path)
    parts = []
    for cell in notebook.cells:
        source = cell.source.strip("\n")
        if not source:
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
        elif cell.cell_type == "code":
            parts.append(f"```python\n{source}\n```")
    return "\n\n".join(parts) + "\n"


def lookup(tree: griffe.Module, path: str) -> griffe.Object | None:
    """The object at dotted ``path`` in the package ``tree``, following re-exports; ``None`` if outside."""
    for _ in range(10):
        if path == tree.path:
            return tree
        if not path.startswith(f"{tree.path}."):
            return None
        try:
            found = tree[path[len(tree.path) + 1 :]]
        except (KeyError, ValueError, griffe.AliasResolutionError):
            return None
        if not isinstance(found, griffe.Alias):
            return found
        path = found.target_path
    return None


def find_definition(package: griffe.Module, name: str) -> griffe.Object | None:
    """Where a lazily exported ``name`` of ``package`` is defined: the public submodule nearest to
    the package (breadth first, sorted) that defines a public object of that name itself."""
    level = [package]
    while level:
        children = [
            child
            for module in level
            for child_name, child in sorted(module.modules.items())
            if not child_name.startswith("_") and not isinstance(child, griffe.Alias)
        ]
        for child in children:
            member = child.members.get(name)
            if member is not None and not isinstance(member, griffe.Alias):
                return member
        level = [child for child in children if child.is_package]
    return None


def exported_names(package: griffe.Module) -> list[str] | None:
    """The package's ``__all__`` (``None`` without one).

    Read statically when it is a literal list; when it is computed (e.g. ``sorted(_EXPORTS)`` of a
    lazy-export table) the package is imported to read it, which runs only its ``__init__`` (the
    lazy exports stay unimported). If that import fails, the static view is used.
    """
    static = [n if isinstance(n, str) else n.name for n in (package.exports or [])]
    if static or "__all__" not in package.members:
        return static if "__all__" in package.members else None
    try:
        computed = getattr(importlib.import_module(package.path), "__all__", None)
    except Exception:  # noqa: BLE001 - any import failure: fall back to the static view
        return static
    return [str(n) for n in computed] if computed is not None else static


def summary_line(obj: griffe.Object) -> str:
    """The first line of ``obj``'s docstring, or nothing."""
    if obj.docstring is None or not obj.docstring.value.strip():
        return ""
    return obj.docstring.value.strip().splitlines()[0]


def documented(obj: griffe.Object, modules: dict[str, bool]) -> bool:
    """Whether mkdocstrings renders ``obj`` on an API page (public, in a documented module; mkdocs.yml
    sets ``show_if_no_docstring``), so a cross-reference to it resolves."""
    if obj.is_module:
        return obj.path in modules
    parent = obj.parent
    return (
        parent is not None
        and parent.is_module
        and parent.path in modules
        and obj.is_public
        and not obj.name.startswith("_")
    )


def package_page(tree: griffe.Module, name: str, modules: dict[str, bool]) -> str:
    """A package's API page: its docstring and own members, then links to what it re-exports and
    to its submodules' pages."""
    package = lookup(tree, name)
    assert isinstance(package, griffe.Module), name
    exports = exported_names(package)
    own: list[str] = []
    links: list[str] = []
    for export in exports or []:
        member = package.members.get(export)
        if member is not None and not isinstance(member, griffe.Alias):
            own.append(export)
            continue
        target = lookup(tree, member.target_path) if member is not None else find_definition(package, export)
        if target is not None and documented(target, modules):
            summary = summary_line(target)
            links.append(f"- [`{export}`][{target.path}]" + (f": {summary}" if summary else ""))
        else:
            links.append(f"- `{export}`")
    lines = [f"::: {name}"]
    if exports is not None:  # without __all__, mkdocstrings renders the public members itself
        lines += ["    options:", "      members: " + ("[" + ", ".join(own) + "]" if own else "false")]
    lines.append("")
    if links:
        lines += ["## Exported names", "", *links, ""]
    children = [m for m in modules if m.rpartition(".")[0] == name]
    if children:
        lines += ["## Modules", ""]
        for child in children:
            child_obj = lookup(tree, child)
            summary = summary_line(child_obj) if child_obj is not None else ""
            lines.append(f"- [`{child}`][{child}]" + (f": {summary}" if summary else ""))
        lines.append("")
    return "\n".join(lines)


def write(page: str, text: str, source: str | None) -> None:
    """Write a generated page; ``source`` (a repository path) becomes its edit path."""
    with mkdocs_gen_files.open(page, "w") as handle:
        handle.write(text)
    if source is not None:
        mkdocs_gen_files.set_edit_path(page, source)


def main() -> None:
    """Generate every page and the navigation."""
    docs_rel = DOCS_DIR.relative_to(ROOT).as_posix()
    guides = sorted(p for p in DOCS_DIR.glob("*.md") if p.name not in {"index.md", "SUMMARY.md"})
    notebooks = sorted(p for p in (ROOT / "notebooks").glob("*.py") if is_notebook(p))

    # Repository path -> site path, for every Markdown file the site renders.
    site_of = {"README.md": "index.md", "benchmarks/README.md": "benchmarks.md"}
    site_of.update({f"{docs_rel}/{p.name}": p.name for p in guides})
    site_of["notebooks/README.md"] = "notebooks/index.md"
    site_of.update({f"notebooks/{p.name}": f"notebooks/{p.stem}.md" for p in notebooks})

    # Rendered Markdown pages: (site path, repository path, text).
    pages: list[tuple[str, str, str]] = []
    for source, page in site_of.items():
        path = ROOT / source
        if path.suffix == ".py":
            text = notebook_markdown(path)
        else:
            text = path.read_text(encoding="utf-8")
        pages.append((page, source, text))
    for page, source, text in pages:
        rewritten = rewrite_links(text, source, page, site_of)
        # Guides live in docs_dir already; only write them when a link had to be rewritten.
        if source.startswith(f"{docs_rel}/") and rewritten == text:
            continue
        write(page, rewritten, source)
    titles = {page: title_of(text, Path(page).stem) for page, _, text in pages}

    nav = mkdocs_gen_files.Nav()
    nav["Home"] = "index.md"
    for path in guides:
        nav["Guides", titles[path.name]] = path.name
    nav["Guides", titles["benchmarks.md"]] = "benchmarks.md"
    nav["Notebooks", "Overview"] = "notebooks/index.md"
    for path in notebooks:
        page = f"notebooks/{path.stem}.md"
        nav["Notebooks", titles[page]] = page

    modules = dict([(PACKAGE, True), *public_modules(ROOT / PACKAGE, PACKAGE)])
    # The same docstring rewriting as the rendered pages, so summary lines link the same way.
    extensions = griffe.load_extensions(f"{DOCS_DIR / 'griffe_grouped_args.py'}:GroupedArgs")
    tree = griffe.load(PACKAGE, search_paths=[str(ROOT)], resolve_aliases=False, extensions=extensions)
    assert isinstance(tree, griffe.Module), tree
    for name, is_package in modules.items():
        parts = name.split(".")
        page = "/".join(["reference", *parts, "index.md"] if is_package else ["reference", *parts[:-1], f"{parts[-1]}.md"])
        source = "/".join(parts) + ("/__init__.py" if is_package else ".py")
        text = package_page(tree, name, modules) if is_package else f"::: {name}\n"
        write(page, text, source)
        nav[("API reference", *parts)] = page

    with mkdocs_gen_files.open("SUMMARY.md", "w") as handle:
        handle.writelines(nav.build_literate_nav())


main()
