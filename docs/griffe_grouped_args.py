"""Griffe extension: split grouped argument entries so each parameter is documented and checked.

medmeta's Google-style docstrings document related parameters on one line, ``a, b: ...`` or
``a / b: ...``. Griffe's Google parser reads such a line as one parameter named ``"a, b"`` and
warns that it is not in the signature. This extension rewrites the entry into one entry per name
(same type and description) before the docstring is parsed, so the pages list every parameter and
``mkdocs build --strict`` still fails on a documented parameter that the signature does not have.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(
    r"^(?P<indent>\s*)(?:Args|Arguments|Params|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$"
)
# A Sphinx cross-reference role: :class:`~medmeta.x.Y`, :func:`title <medmeta.x.f>`, :mod:`~.sibling`.
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<body>[^`]+)`")
_GROUPED = re.compile(
    r"^(?P<indent>\s+)(?P<names>\*{0,2}\w+(?:\s*[,/]\s*\*{0,2}\w+)+)(?P<annotation>\s*\([^)]*\))?:(?P<rest>\s.*|)$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_args(text: str) -> str:
    """Return ``text`` with every grouped entry of its argument sections split into one per name."""
    lines = text.splitlines()
    out: list[str] = []
    header: int | None = None  # indent of the current argument section's header, if inside one
    entry: int | None = None  # indent of that section's entries
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        section = _SECTION.match(line)
        if section:
            header, entry = len(section.group("indent")), None
            out.append(line)
            continue
        if header is not None and line.strip() and _indent(line) <= header:
            header = None
        if header is None or not line.strip():
            out.append(line)
            continue
        if entry is None:
            entry = _indent(line)
        grouped = _GROUPED.match(line) if _indent(line) == entry else None
        if grouped is None:
            out.append(line)
            continue
        continuation: list[str] = []
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > entry:
            continuation.append(lines[i])
            i += 1
        annotation = grouped.group("annotation") or ""
        for name in re.split(r"\s*[,/]\s*", grouped.group("names")):
            out.append(f"{grouped.group('indent')}{name}{annotation}:{grouped.group('rest')}")
            out.extend(continuation)
    return "\n".join(out)


def sphinx_roles_to_markdown(text: str, package: str = "medmeta") -> str:
    """Turn Sphinx roles into Markdown: a link for a fully qualified ``package`` name, else code.

    ``:class:`~medmeta.x.Y``` becomes ``[`Y`][medmeta.x.Y]`` (an autorefs cross-reference, which
    ``mkdocs build --strict`` fails on when nothing documents ``medmeta.x.Y``); a relative or
    unqualified name (``:mod:`~.reader```, ``:class:`Foo```) or another package's becomes ``Foo``
    in code, since it cannot be resolved reliably.
    """

    def replace(match: re.Match[str]) -> str:
        body = match.group("body").strip()
        titled = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        target = titled.group("target") if titled else body
        short = target.startswith("~")
        target = target.lstrip("~").rstrip("()")
        if titled:
            title = titled.group("title")
        else:
            title = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        if target == package or target.startswith(f"{package}."):
            return f"[`{title}`][{target}]"
        return f"`{title}`"

    return _ROLE.sub(replace, text)


class GroupedArgs(griffe.Extension):
    """Split grouped argument entries of every docstring (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring before anything parses it."""
        if obj.docstring is not None:
            obj.docstring.value = sphinx_roles_to_markdown(split_grouped_args(obj.docstring.value))
