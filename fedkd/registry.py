"""Name -> object registries for every kind of plug-in (strategies, models, data...).

A config names a plug-in either by its registered name (``"mlp"``) or by an import
path to user code (``"my_lab.models:WideMLP"``), so users extend fedkd without
forking it and the code never branches on names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A plug-in name that is neither registered nor an importable path."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def import_ref(ref: str) -> Any:
    """Import ``"package.module:attr"`` and return ``attr``."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UnknownNameError(f"import path {ref!r} must look like 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownNameError(f"cannot import module {module_name!r} for {ref!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownNameError(f"module {module_name!r} has no attribute {attr!r}") from None


class Registry(Generic[T]):
    """Names -> plug-ins of one kind.

    Args:
        kind: what is registered, used in error messages ("model", "dataset", ...).
        check: validates an entry (registered or imported); raises TypeError if unfit.
        autoload: a module imported before the first lookup, where built-ins register.
    """

    def __init__(
        self, kind: str, check: Callable[[Any], bool] | None = None, autoload: str | None = None
    ) -> None:
        self.kind = kind
        self._check = check
        self._autoload = autoload
        self._by_name: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (default: its __name__)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"a {self.kind} needs a name to be registered")
            if key in self._by_name and self._by_name[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._validate(obj, key)
            self._by_name[key] = obj
            return obj

        return add

    def _validate(self, obj: Any, ref: str) -> None:
        if self._check is not None and not self._check(obj):
            raise TypeError(f"{ref!r} is not a valid {self.kind}")

    def _load_builtins(self) -> None:
        if self._autoload:
            importlib.import_module(self._autoload)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_builtins()
        return sorted(self._by_name)

    def get(self, ref: str) -> T:
        """A registered name, or ``"package.module:Name"`` for user code."""
        if not isinstance(ref, str) or not ref:
            raise UnknownNameError(f"{self.kind} must be a non-empty name, got {ref!r}")
        if ":" in ref:
            obj = import_ref(ref)
        else:
            self._load_builtins()
            if ref not in self._by_name:
                raise UnknownNameError(
                    f"unknown {self.kind} {ref!r}; known: {', '.join(self.names())} "
                    "(or an import path 'package.module:Name')"
                )
            obj = self._by_name[ref]
        self._validate(obj, ref)
        return obj

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def bind_params(
    target: Any, params: dict[str, Any], path: str, runtime: tuple[str, ...] = ()
) -> None:
    """Check that ``params`` fit ``target``'s keyword parameters (``runtime`` ones excluded).

    Raises a :class:`fedkd.config.ConfigError` naming ``path.<param>`` for an unknown
    parameter, so that a typo in a config fails before any simulation starts.
    """
    import inspect

    from fedkd.config import ConfigError

    sig = inspect.signature(target)
    accepted = [
        n
        for n, p in sig.parameters.items()
        if n not in runtime and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{path}.{key}", f"unknown parameter; valid: {', '.join(accepted) or '(none)'}"
            )
