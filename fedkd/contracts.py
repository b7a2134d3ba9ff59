"""Checks that strategy hooks keep their contracts, with errors people can read.

A hook that returns the wrong thing fails with one line naming the strategy class,
the hook, what it returned and what the contract expects, instead of a traceback
from deep inside the round loop or the wire format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedkd.payloads import Payload

#: what hooks return as metrics: names to finite floats
Metrics = dict[str, float]


class HookError(TypeError):
    """A strategy hook broke its contract (wrong return type or value)."""


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line (the first line of a multi-line message)."""
    text = str(err).strip().splitlines()
    name = type(err).__name__
    return f"{name}: {text[0]}" if text else name


def min_usable(fraction: float, sampled: int) -> int:
    """Usable replies a round needs: ``fraction`` of ``sampled``, rounded up (float-safe:
    0.55 of 100 needs 55, not 56)."""
    return math.ceil(fraction * sampled - 1e-9)


def describe(value: Any) -> str:
    """A short description of a value: its type, and its shape or length where useful."""
    if value is None:
        return "None"
    name = type(value).__name__
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{name} of shape {tuple(shape)}"
    if isinstance(value, list | tuple | dict | set):
        return f"{name} of length {len(value)}"
    return name


def _owner(strategy: Any) -> str:
    return type(strategy).__name__


def check_metrics(strategy: Any, hook: str, value: Any) -> dict[str, float]:
    """``value`` must be a mapping of metric names to finite numbers (``{}`` for none)."""
    if not isinstance(value, Mapping):
        raise HookError(
            f"{_owner(strategy)}.{hook} returned {describe(value)}; the contract expects a dict "
            "of metric name -> float (return {} when there is nothing to report)"
        )
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise HookError(
                f"{_owner(strategy)}.{hook} returned a metric named {k!r}; names must be strings"
            )
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise HookError(
                f"{_owner(strategy)}.{hook} returned metric {k!r} = {describe(v)}; "
                "metric values must be numbers"
            )
        if not math.isfinite(float(v)):
            raise HookError(f"{_owner(strategy)}.{hook} returned metric {k!r} = {v}; not finite")
        out[k] = float(v)
    return out


def check_payload(strategy: Any, hook: str, value: Any, *, optional: bool = True) -> Payload | None:
    """``value`` must be a :class:`Payload` (or None, when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, Payload):
        what = "a Payload (e.g. Logits(idx, values))" + (" or None" if optional else "")
        raise HookError(
            f"{_owner(strategy)}.{hook} returned {describe(value)}; the contract expects {what}"
        )
    return value
