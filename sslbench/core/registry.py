"""One registry type for every kind of extension, each with an entry-point group.

sslbench is extended in five ways, all through :class:`Registry`: methods (``sslbench.methods``),
evaluation protocols (``sslbench.protocols``), data sources (``sslbench.data_sources``: the prefix
of a data spec such as ``imagefolder:`` or ``hf:``), sub-commands (``sslbench.commands``) and
training callbacks (``sslbench.callbacks``). A registry imports its built-in modules, then every
entry point of its group, the first time it is read; each entry point names a module (or an object
in it) whose import runs the registering decorator, e.g. in a plugin's ``pyproject.toml``::

    [project.entry-points."sslbench.methods"]
    barlow = "my_pkg.barlow"

``sslbench list <kind>`` lists what each registry holds. Plugins register through the decorators
that :mod:`sslbench.api` exports (``register_method``, ``register_protocol``,
``register_data_source``, ``register_command``, ``register_callback``).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sslbench.core.errors import UserError

if TYPE_CHECKING:
    from sslbench.core.method import Method

T = TypeVar("T")

METHODS_ENTRY_POINT_GROUP = "sslbench.methods"
COMMANDS_ENTRY_POINT_GROUP = "sslbench.commands"


def _same(old: object, new: object) -> bool:
    """Whether ``new`` is ``old`` again (a module imported twice, e.g. as a script and as a module)."""
    return old is new or getattr(old, "__qualname__", None) == getattr(new, "__qualname__", object())


class Registry(Generic[T]):
    """A name -> object table of one extension kind, in registration order.

    Its unknown-name error lists the valid names and close matches. On first read it imports the
    ``builtins`` (module names), then loads every entry point of ``group``; a broken third-party
    plugin is a warning, never a failure of sslbench. ``check(name, obj)`` raises ``TypeError`` for
    an object that is not of the kind; ``same(old, new)`` tells a re-registration of the same object
    (allowed) from a second object under a taken name (a ``ValueError``).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        builtins: Sequence[str] = (),
        *,
        check: Callable[[str, T], None] | None = None,
        same: Callable[[T, T], bool] = _same,
        n_close: int = 3,
        ordered: bool = False,
        origin: Callable[[T], str | None] = lambda obj: getattr(obj, "__module__", None),
    ) -> None:
        self.kind = kind  # what the entries are, for messages ("method", "data source")
        self.group = group  # the entry-point group third-party packages register under
        self.builtins = tuple(builtins)  # modules whose import registers the built-in entries
        self._check = check
        self._same = same
        self._n_close = n_close  # close matches an unknown-name error suggests
        self._ordered = ordered  # names() in registration order (True) or sorted (False)
        self._origin = origin  # the module that registered an entry (an ordered registry lists the built-ins' modules in order)
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name`` (and setting ``obj.name`` where it can)."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            try:
                obj.name = name  # type: ignore[attr-defined]  # T is any object; one that refuses the attribute is skipped
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Add ``obj`` under ``name``; a second, different object under one name is an error."""
        if self._check is not None:
            self._check(name, obj)
        old = self._items.get(name)
        if old is not None and not self._same(old, obj):
            raise ValueError(f"{self.kind} {name!r} is already registered by {old!r}")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Remove ``name`` if registered (tests)."""
        self._items.pop(name, None)

    def load(self) -> None:
        """Import the built-ins, then every entry point of the group (once)."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtins:
            importlib.import_module(module)
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken third-party plugin must not break sslbench
                warnings.warn(f"could not load sslbench {self.kind} plugin {ep.name!r} ({ep.value}): {exc}", stacklevel=2)

    def names(self) -> list[str]:
        """The registered names: sorted, or for an ``ordered`` registry the built-ins in the order of
        their modules (whichever was imported first), each module's in registration order, then
        the others (plugins) in registration order."""
        self.load()
        return self._ordered_names() if self._ordered else sorted(self._items)

    def _ordered_names(self) -> list[str]:
        self.load()
        rank = {module: i for i, module in enumerate(self.builtins)}
        return sorted(self._items, key=lambda name: rank.get(self._origin(self._items[name]) or "", len(rank)))

    def items(self) -> list[tuple[str, T]]:
        """``(name, obj)`` pairs sorted by name."""
        self.load()
        return sorted(self._items.items())

    def in_order(self) -> list[T]:
        """The entries in the order of an ``ordered`` registry's :meth:`names` (built-ins first, in
        the order of their modules): the order of flags and help texts."""
        return [self._items[name] for name in self._ordered_names()]

    def get(self, name: str) -> T:
        """The entry ``name``; a :class:`UserError` listing the valid names (and close matches) otherwise."""
        self.load()
        if name in self._items:
            return self._items[name]
        raise UserError(unknown_name_message(self.kind, name, self.names(), n_close=self._n_close))

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._items


def unknown_name_message(kind: str, name: str, valid: list[str], *, n_close: int = 3) -> str:
    """``unknown method 'simclrr' (did you mean 'simclr'?); valid: byol, moco, simclr``."""
    close = difflib.get_close_matches(name, valid, n=n_close, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
    return f"unknown {kind} {name!r}{hint}; valid: {shown}"


# --------------------------------------------------------------------------------------------
# Methods


def _check_method(name: str, cls: Any) -> None:
    from sslbench.core.method import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r}: {cls!r} must subclass sslbench.api.Method (see docs/write-your-own-method.md)")


METHODS: Registry[type[Method]] = Registry("method", METHODS_ENTRY_POINT_GROUP, ("sslbench.methods",), check=_check_method)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("simclr")`` adds a method plugin to :data:`METHODS`.
    The class must subclass :class:`sslbench.api.Method` (the contract the trainer calls)."""
    return METHODS.register(name)


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name``; a :class:`UserError` listing valid names otherwise."""
    return METHODS.get(name)


# --------------------------------------------------------------------------------------------
# Sub-commands

#: A sub-command is ``register(subparsers)``: it adds its parser to argparse's sub-parsers and sets
#: the parser's ``func`` (``args -> exit code``) with ``set_defaults(func=...)``.
Command = Callable[[Any], None]

COMMANDS: Registry[Command] = Registry(
    "command",
    COMMANDS_ENTRY_POINT_GROUP,
    (
        "sslbench.commands.cli",
        "sslbench.commands.doctor",
        "sslbench.commands.evaluate",
        "sslbench.commands.compare",
        "sslbench.commands.export",
        "sslbench.commands.curves",
        "sslbench.commands.picture",
        "sslbench.commands.shard",
    ),
)


def register_command(name: str) -> Callable[[Command], Command]:
    """Decorator: ``@register_command("plot")`` on ``register(subparsers)`` adds the sub-command
    ``sslbench plot``; the CLI's parser is built from :data:`COMMANDS`."""
    return COMMANDS.register(name)
