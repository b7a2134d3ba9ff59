"""The seal on a client's private data under a training-time privacy mechanism.

Under DP-SGD the guarantee covers only what trains through Opacus, so a client
strategy must never see its private inputs or labels in the clear. While
:func:`sealed` holds, :class:`~fedkd.strategy.ClientNode` keeps them out of the node
(``vars(node)``, ``dataclasses.asdict``, ``copy.copy`` and pickling do not carry
them), reading ``node.x`` or ``node.y`` raises :class:`PrivacyError`, the node's
privacy settings cannot be changed, and DP-SGD refuses a student or optimizer that
could watch the private batches (hooks, a patched ``forward`` or ``step``, foreign
classes, autograd or torch-function interceptors). The runtime reads the data through
``node.private_data()``, which only fedkd's own modules may call while sealed.

:func:`fedkd.privacy.preflight.preflight` runs every distinct client strategy once on
synthetic data before round 1, so most violations are refused as a
:class:`~fedkd.config.ConfigError` before any budget is spent; those it cannot reach
still meet the seal at run time.

The seal catches mistakes and ordinary code, not a strategy set on defeating it:
code in the same process can monkeypatch fedkd, Opacus or torch's functions, trace
frames, or reach the store below through fedkd's internals.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch

from fedkd.config import PrivacyConfig
from fedkd.privacy.accounting import PrivacyError

if TYPE_CHECKING:
    from fedkd.client_node import ClientNode

PRIVATE = frozenset({"x", "y"})  # the node fields that hold private data

# Per node: its sealed and locked values, held outside the object (keyed by identity).
_STORE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


@functools.cache
def _seals(name: str) -> str | None:
    """What a strategy trains with under mechanism ``name`` if it seals the private data
    (a training-time mechanism), else None."""
    from fedkd.privacy.mechanism import mechanism_class

    cls = mechanism_class(name)  # a training-time mechanism says so on its class
    return (cls.trains_with or "node.train_private(...)") if cls.acts_on == "training" else None


def sealed(privacy: PrivacyConfig | None) -> bool:
    """Whether ``privacy`` seals clients' private data (a training-time mechanism)."""
    return privacy is not None and _seals(privacy.mechanism) is not None


def sealed_message(who: str, what: str, privacy: PrivacyConfig) -> str:
    """One line: who touched what, under which mechanism, and what to do instead."""
    return (
        f"{who} read {what} under privacy.mechanism = {privacy.mechanism!r}: private data is "
        f"sealed; train on it with {_seals(privacy.mechanism)}, or use "
        "privacy.mechanism = 'client_gaussian'"
    )


def stored(node: Any, name: str) -> Any:
    """A value kept in the store for ``node``; the sealed private data only for fedkd."""
    if name in PRIVATE and sealed(node.privacy) and not runtime_caller():
        raise PrivacyError(node._sealed_message(f"the stored node.{name}"))
    try:
        return _STORE[node][name]
    except KeyError:
        raise AttributeError(f"this {type(node).__name__} holds no stored {name!r}") from None


def store(node: Any, name: str, value: Any) -> None:
    """Keep ``value`` for ``node`` outside the object."""
    _STORE.setdefault(node, {})[name] = value


def has_stored(node: Any, name: str) -> bool:
    """Whether ``node`` has a stored ``name``."""
    return name in _STORE.get(node, {})


def snapshot(node: Any) -> dict[str, Any]:
    """All stored values of ``node`` (for copying an unsealed node)."""
    if sealed(_STORE.get(node, {}).get("privacy")):
        raise PrivacyError(node._sealed_message("node.x and node.y (copying the node)"))
    return dict(_STORE.get(node, {}))


def restore(node: Any, values: dict[str, Any]) -> None:
    """Give a copied ``node`` the stored values of its original."""
    _STORE[node] = dict(values)


class Sealed:
    """A dataclass field kept outside the instance, unreadable while the node is sealed.

    Class access raises AttributeError, so the field has no default.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, node: Any, owner: type | None = None) -> Any:
        if node is None:
            raise AttributeError(self.name)
        if sealed(node.privacy):
            raise PrivacyError(node._sealed_message(f"node.{self.name}"))
        return stored(node, self.name)

    def __set__(self, node: Any, value: Any) -> None:
        store(node, self.name, value)


class Locked:
    """A dataclass field that cannot change once the node is sealed (the privacy
    settings and client settings DP-SGD runs under)."""

    def __init__(self, default: Any = ...) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, node: Any, owner: type | None = None) -> Any:
        if node is None:
            if self.default is ...:
                raise AttributeError(self.name)  # no dataclass default
            return self.default
        return stored(node, self.name)

    def __set__(self, node: Any, value: Any) -> None:
        privacy = _STORE.get(node, {}).get("privacy")
        if sealed(privacy) and has_stored(node, self.name) and value is not stored(node, self.name):
            raise PrivacyError(
                f"{node._who()} changed node.{self.name} under privacy.mechanism = "
                f"{privacy.mechanism!r}: the privacy settings are fixed for the whole run"
            )
        store(node, self.name, value)


def runtime_caller(depth: int = 2) -> bool:
    """Whether the function ``depth`` frames up belongs to fedkd itself."""
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name == "fedkd" or name.startswith("fedkd.")


# --- what DP-SGD refuses to train ------------------------------------------------------

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PARAM_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_MODULE_CALLS = ("forward", "__call__", "_call_impl", "_wrapped_call_impl")
_CALL_OVERRIDES = frozenset(_MODULE_CALLS)


def _global_hooks() -> list[str]:
    from torch.nn.modules import module
    from torch.optim import optimizer

    names = [
        (module, "_global_forward_hooks"),
        (module, "_global_forward_pre_hooks"),
        (module, "_global_backward_hooks"),
        (module, "_global_backward_pre_hooks"),
        (optimizer, "_global_optimizer_pre_hooks"),
        (optimizer, "_global_optimizer_post_hooks"),
    ]
    found = [f"global {n[8:]}" for m, n in names if getattr(m, n, None)]
    autograd = torch._C._autograd
    if getattr(autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False) is not None:
        found.append("saved-tensor hooks")
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        found.append("a torch function or dispatch mode")
    return found


def _hooks(model: torch.nn.Module) -> dict[tuple[int, str, int], str]:
    """Every hook on ``model``'s modules and parameters: (owner id, kind, key) -> where."""
    out: dict[tuple[int, str, int], str] = {}
    for name, m in model.named_modules():
        where = f"node.model{'.' + name if name else ''}"
        for kind in _MODULE_HOOKS:
            out.update(((id(m), kind, k), where) for k in getattr(m, kind, None) or {})
        for pname, p in m.named_parameters(recurse=False):
            for kind in _PARAM_HOOKS:
                out.update(
                    ((id(p), kind, k), f"{where}.{pname}") for k in getattr(p, kind, None) or {}
                )
    return out


def _patched(cls: type, names: tuple[str, ...]) -> list[str]:
    """Methods of ``cls`` (or a base) replaced from outside the defining class's module."""
    out = []
    for name in names:
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is not None and owner is not object:
            method = vars(owner)[name]
            if getattr(method, "__module__", None) != owner.__module__:
                out.append(f"{owner.__qualname__}.{name}")
    return out


def fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """What the runtime built: module classes, optimizer class, hooks already present."""
    return frozenset(type(m) for m in model.modules()), type(optimizer), frozenset(_hooks(model))


def interceptors(node: ClientNode) -> list[str]:
    """What could see the private batches during DP-SGD besides Opacus itself."""
    found = _global_hooks()
    built_modules, built_optimizer, built_hooks = stored(node, "built")
    hooked = {where for key, where in _hooks(node.model).items() if key not in built_hooks}
    found += [f"hooks on {where}" for where in sorted(hooked)]
    classes = {type(m) for m in node.model.modules()}
    found += [f"a patched {m}" for cls in classes for m in _patched(cls, _MODULE_CALLS)]
    for name, m in node.model.named_modules():
        where = f"node.model{'.' + name if name else ''}"
        cls = type(m)
        if cls not in built_modules and not cls.__module__.startswith("torch.nn."):
            found.append(f"{where} of class {cls.__qualname__}")
        if _CALL_OVERRIDES & vars(m).keys():
            found.append(f"a patched call on {where}")
        for pname, p in m.named_parameters(recurse=False):
            if type(p) is not torch.nn.Parameter:
                found.append(f"{where}.{pname} of class {type(p).__qualname__}")
        for bname, b in m.named_buffers(recurse=False):
            if type(b) is not torch.Tensor:
                found.append(f"{where}.{bname} of class {type(b).__qualname__}")
    opt = node.optimizer
    cls = type(opt)
    if cls is not built_optimizer and not cls.__module__.startswith("torch.optim."):
        found.append(f"node.optimizer of class {cls.__qualname__}")
    found += [f"a patched {m}" for m in _patched(cls, ("step", "zero_grad"))]
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        found.append("hooks on node.optimizer")
    from fedkd.data.transforms import Augment  # it transforms the private batches

    if type(node.augment) is not Augment:
        found.append(f"node.augment of class {type(node.augment).__qualname__}")
    found += [f"a patched {m}" for m in _patched(Augment, ("__call__",))]
    return sorted(set(found), key=found.index)


def check_untampered(node: ClientNode) -> None:
    """Refuse DP-SGD when anything but Opacus could watch the private batches."""
    found = interceptors(node)
    if found:
        assert node.privacy is not None
        raise PrivacyError(
            f"{node._who()} asked for DP-SGD under privacy.mechanism = "
            f"{node.privacy.mechanism!r} with {', '.join(found)}, which could see the private "
            "batches in the clear; train the student as built, without hooks or wrappers"
        )
