"""Name -> object registries for every kind of plug-in (strategies, models, data...).

A config names a plug-in either by its registered name (``"mlp"``) or by an import
path to user code (``"my_lab.models:WideMLP"``), so users extend fedkd without
forking it and the code never branches on names.

Installed packages add names too, through entry points: a distribution that declares

    [project.entry-points."fedkd.strategies"]
    some_kd = "some_kd_algo:SomeServer"

makes ``strategy.name = "some_kd"`` work once it is ``pip install``-ed. A registry
consults its group (``Registry.group``) only for a name it does not know
(built-ins win), loads that one entry point, checks and registers it; listings show
installed names without importing them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A plug-in name that is neither registered nor an importable path."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class EntryPointError(UnknownNameError):
    """An installed entry point that cannot be used: it fails to import, is not a valid
    plug-in of its kind, or its name is declared by more than one distribution.

    A subclass of :class:`UnknownNameError`, so that config checks report it as they
    report an unknown name, naming the config field."""


def _plural(kind: str) -> str:
    word = kind.replace(" ", "_")
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    name = getattr(dist, "name", None) or dist.metadata["Name"]
    return f"distribution {name!r}"


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    return f"entry point {ep.name!r} = {ep.value!r} of {_dist_name(ep)} (group {ep.group!r})"


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
        group: the entry-point group installed packages add names to (default
            ``fedkd.<kind>s``, spaces as underscores; ``""`` for none).
    """

    def __init__(
        self,
        kind: str,
        check: Callable[[Any], bool] | None = None,
        autoload: str | None = None,
        group: str | None = None,
    ) -> None:
        self.kind = kind
        self._check = check
        self._autoload = autoload
        self._group = group
        self._by_name: dict[str, T] = {}

    @property
    def group(self) -> str:
        """The entry-point group of this registry (``""``: none)."""
        return f"fedkd.{_plural(self.kind)}" if self._group is None else self._group

    def _entry_points(self, name: str | None = None) -> list[importlib.metadata.EntryPoint]:
        """Installed entry points of this registry's group (named ``name`` if given);
        reading them imports nothing."""
        if not self.group:
            return []
        eps = importlib.metadata.entry_points(group=self.group)
        return [ep for ep in eps if name is None or ep.name == name]

    def _load_entry_point(self, name: str) -> T | None:
        """Load, check and register the entry point ``name`` (None if none is installed)."""
        eps = self._entry_points(name)
        if not eps:
            return None
        if len({ep.value for ep in eps}) > 1:
            raise EntryPointError(
                f"{self.kind} {name!r} is declared by several installed packages: "
                + "; ".join(_describe(ep) for ep in eps)
                + "; uninstall all but one, or name the object by import path"
            )
        ep = eps[0]
        try:
            obj = ep.load()
        except Exception as err:  # an import error, or any error the plug-in's import raises
            raise EntryPointError(
                f"cannot load {self.kind} {name!r} from {_describe(ep)}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if self._check is not None and not self._check(obj):
            raise EntryPointError(
                f"{_describe(ep)} is not a valid {self.kind}: it loads "
                f"{getattr(obj, '__qualname__', type(obj).__name__)!r}"
            )
        known = self._by_name.get(name)
        if known is not None and known is not obj:  # its module registered another one
            raise EntryPointError(
                f"{_describe(ep)} loads a different object than the {self.kind} its module "
                f"registered under {name!r}"
            )
        self._by_name[name] = obj
        return obj

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
        """Registered names and those of installed entry points (not loaded), sorted."""
        self._load_builtins()
        return sorted(set(self._by_name).union(ep.name for ep in self._entry_points()))

    def get(self, ref: str) -> T:
        """A registered name, or ``"package.module:Name"`` for user code."""
        if not isinstance(ref, str) or not ref:
            raise UnknownNameError(f"{self.kind} must be a non-empty name, got {ref!r}")
        if ":" in ref:
            obj = import_ref(ref)
        else:
            self._load_builtins()
            if ref in self._by_name:
                obj = self._by_name[ref]
            else:
                found = self._load_entry_point(ref)
                if found is None:
                    raise UnknownNameError(self._unknown(ref))
                return found  # checked on loading
        self._validate(obj, ref)
        return obj

    def _unknown(self, ref: str) -> str:
        installed = sorted({ep.name for ep in self._entry_points()} - set(self._by_name))
        extra = ""
        if installed:
            extra = f" (installed entry points of {self.group!r}: {', '.join(installed)})"
        return (
            f"unknown {self.kind} {ref!r}; known: {', '.join(self.names())}{extra} "
            "(or an import path 'package.module:Name')"
        )

    def __contains__(self, name: str) -> bool:
        """Registered, or the name of an installed entry point (not loaded)."""
        self._load_builtins()
        return name in self._by_name or bool(self._entry_points(name))

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
