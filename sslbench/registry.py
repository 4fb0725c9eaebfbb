"""Typed registries with helpful errors and entry-point discovery.

Methods register themselves with ``@register_method("name")``. Third-party packages add methods
through the entry-point group ``sslbench.methods``: each entry point names a module (or an object in
it) whose import runs the decorator, e.g. in the plugin's ``pyproject.toml``::

    [project.entry-points."sslbench.methods"]
    barlow = "my_pkg.barlow"
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import UserError

if TYPE_CHECKING:
    from .method import Method

T = TypeVar("T")

METHODS_ENTRY_POINT_GROUP = "sslbench.methods"


class Registry(Generic[T]):
    """A name -> object table whose unknown-name error lists the valid names and close matches."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind  # what the entries are, for error messages ("method")
        self._items: dict[str, T] = {}
        self._loader = loader  # imports built-ins and entry points on first lookup
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a second, different object under one name is an error."""

        def deco(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj and getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", object()):
                raise ValueError(f"{self.kind} {name!r} is already registered by {old!r}")
            self._items[name] = obj
            try:
                obj.name = name  # type: ignore[attr-defined]  # T is any object; one that refuses the attribute is skipped
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._ensure_loaded()
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name in self._items:
            return self._items[name]
        raise UserError(unknown_name_message(self.kind, name, self.names()))

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items


def unknown_name_message(kind: str, name: str, valid: list[str], *, n_close: int = 3) -> str:
    """``unknown method 'simclrr' (did you mean 'simclr'?); valid: byol, moco, simclr``."""
    close = difflib.get_close_matches(name, valid, n=n_close, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
    return f"unknown {kind} {name!r}{hint}; valid: {shown}"


def _load_methods() -> None:
    """Import the built-in method plugins, then every entry point of the group ``sslbench.methods``."""
    importlib.import_module("sslbench.methods")  # its __init__ imports the built-in plugins
    for ep in entry_points(group=METHODS_ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not break sslbench
            warnings.warn(f"could not load sslbench method plugin {ep.name!r} ({ep.value}): {exc}", stacklevel=2)


METHODS: Registry[type[Method]] = Registry("method", loader=_load_methods)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("simclr")`` adds a method plugin to :data:`METHODS`.
    The class must subclass :class:`sslbench.method.Method` (the contract the trainer calls)."""
    from .method import Method

    add = METHODS.register(name)

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r}: {cls!r} must subclass sslbench.method.Method (see docs/write-your-own-method.md)")
        return add(cls)

    return deco


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name``; a :class:`UserError` listing valid names otherwise."""
    return METHODS.get(name)
