"""Named components and lazily imported exports: the two small mechanisms every package uses.

:class:`Registry` maps names to factories (learners, segmenters, MIL heads, slide backends,
pretrained weight sources), timm style: ``register`` as a decorator, ``create(name, ...)``,
``names()``; an unknown name is an :class:`~medmeta.errors.UnknownNameError` listing the known
ones, and arguments the factory does not take are an :class:`~medmeta.errors.ArgumentError`. :func:`lazy_exports` gives a package ``__getattr__`` / ``__dir__`` that import a name's
module on first use, so optional extras (OpenSlide, nibabel) load only when needed.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any, Callable, Generic, Optional, TypeVar, overload

from medmeta.errors import ArgumentError, UnknownNameError, known_names

__all__ = ["Registry", "lazy_exports", "normalize_name"]

T = TypeVar("T")
F = TypeVar("F")


def normalize_name(name: str) -> str:
    """Registry key of ``name``: stripped, lower case, ``-`` as ``_`` (``"Proto-MAML"`` -> ``"proto_maml"``)."""
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Name -> factory (a class or function) of one kind of component.

    Look-ups go through :func:`normalize_name` (``"Linear-Probe"`` finds ``"linear_probe"``);
    :meth:`names` lists the names as they were registered (``"imagenet-mobilenetv2"`` stays).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._names: dict[str, str] = {}

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
            if current is not value:  # the same object again keeps its first spelling
                self._names[key] = str(name).strip()
            self._entries[key] = value
            return value

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The factory registered as ``name``."""
        key = normalize_name(name)
        if key not in self._entries:
            known = known_names(str(name), self._names.values(), what=f"{self.kind}s")
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {known}")
        return self._entries[key]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``args`` and ``kwargs``; arguments it does
        not take are an :class:`~medmeta.errors.ArgumentError` naming the component (checked
        against its signature before the call, so a ``TypeError`` inside it stays a bug)."""
        factory: Any = self.get(name)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):  # no introspectable signature (some builtins)
            signature = None
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as err:
                raise ArgumentError(f"{self.kind} {self._names[normalize_name(name)]!r}: {err}") from None
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names as registered, sorted."""
        return sorted(self._names.values())

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests register into a copy)."""
        other: Registry[T] = Registry(self.kind)
        other._entries = dict(self._entries)
        other._names = dict(self._names)
        return other

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
