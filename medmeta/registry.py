"""Named components and lazily imported exports: the two small mechanisms every package uses.

:class:`Registry` maps names to factories (learners, segmenters, MIL heads, slide backends,
pretrained weight sources), timm style: ``register`` as a decorator, ``create(name, ...)``,
``names()``; an unknown name is an :class:`~medmeta.errors.UnknownNameError` listing the known
ones. :func:`lazy_exports` gives a package ``__getattr__`` / ``__dir__`` that import a name's
module on first use, so optional extras (OpenSlide, nibabel) load only when needed.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Callable, Generic, Optional, TypeVar, overload

from medmeta.errors import UnknownNameError, known_names

__all__ = ["Registry", "lazy_exports", "normalize_name"]

T = TypeVar("T")
F = TypeVar("F")


def normalize_name(name: str) -> str:
    """Registry key of ``name``: stripped, lower case, ``-`` as ``_`` (``"Proto-MAML"`` -> ``"proto_maml"``)."""
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Name -> factory (a class or function) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[F], F]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name: str, obj: Optional[Any] = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, a decorator. A taken name is an error
        unless ``overwrite`` (re-registering the same object is allowed)."""
        key = normalize_name(name)

        def add(value: Any) -> Any:
            current = self._entries.get(key)
            if current is not None and current is not value and not overwrite:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = value
            return value

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The factory registered as ``name``."""
        key = normalize_name(name)
        if key not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {known_names(key, self._entries)}")
        return self._entries[key]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``args`` and ``kwargs``."""
        factory: Any = self.get(name)
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``exports`` map a public name to the
    submodule (relative to ``package``) that defines it. Usage in an ``__init__.py``::

        __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
