"""Server aggregators for logit-type payloads: plain and robust ways to combine clients.

An aggregator turns the stacked values of n clients, shape ``(n, *shape)``, into one
array of ``shape``. Built-in strategies that combine logits or soft labels call
:meth:`fedkd.strategy.ServerNode.combine`, which applies the aggregator named by
``server.aggregator`` (a registered name or ``"pkg.mod:Class"``, with its parameters):

* ``mean``: the (weighted) mean, with the weights the strategy passes (none: uniform);
  bit-identical to :meth:`fedkd.payloads.Logits.mean`;
* ``weighted_mean``: the mean weighted by each client's private-set size;
* ``median``: coordinate-wise median (Yin et al., 2018, arXiv:1803.01498);
* ``trimmed_mean``: coordinate-wise mean after dropping the ``beta`` share of the
  largest and of the smallest values (Yin et al., 2018);
* ``clipped_mean``: each client's array clipped to L2 norm ``clip`` (0: the median of
  the clients' norms, as in centred clipping heuristics), then the mean.

The robust ones ignore the strategy's weights: robustness needs every client to
count the same.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from fedkd.config import ConfigError, Spec
from fedkd.registry import Registry, bind_params


class Aggregator(ABC):
    """Combines the arrays of n clients into one. Subclass, register, implement ``__call__``.

    ``by_size``: the server passes private-set sizes as ``weights`` instead of the
    strategy's own weights.
    """

    by_size: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """``values``: float64 ``(n, *shape)``; ``weights``: ``(n,)`` non-negative or None."""


AGGREGATORS: Registry[type[Aggregator]] = Registry(
    "aggregator",
    check=lambda c: isinstance(c, type) and issubclass(c, Aggregator),
    group="fedkd.aggregators",
)


@AGGREGATORS.register("mean")
class Mean(Aggregator):
    """The (weighted) mean; uniform when no weights are given."""

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), values, axes=1)


@AGGREGATORS.register("weighted_mean")
class WeightedMean(Mean):
    """The mean weighted by each client's private-set size (FedAvg's weighting)."""

    by_size = True


@AGGREGATORS.register("median")
class Median(Aggregator):
    """Coordinate-wise median."""

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.median(values, axis=0)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise mean without the ``beta`` share of largest and of smallest values
    (``floor(beta * n)`` from each end; with fewer clients nothing is trimmed)."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = beta

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        n = len(values)
        k = math.floor(self.beta * n)
        if k == 0:
            return values.mean(axis=0)
        return np.sort(values, axis=0)[k : n - k].mean(axis=0)


@AGGREGATORS.register("clipped_mean")
class ClippedMean(Aggregator):
    """Mean of the clients' arrays, each first scaled down to L2 norm at most ``clip``
    (``clip = 0``: the median of this round's norms)."""

    def __init__(self, clip: float = 0.0) -> None:
        if clip < 0:
            raise ValueError(f"clip must be >= 0 (0: median norm), got {clip!r}")
        self.clip = clip

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        flat = values.reshape(len(values), -1)
        norms = np.linalg.norm(flat, axis=1)
        bound = self.clip or float(np.median(norms))
        scale = np.minimum(1.0, bound / np.maximum(norms, 1e-12))
        return (flat * scale[:, None]).mean(axis=0).reshape(values.shape[1:])


def make_aggregator(spec: Spec, path: str = "server.aggregator") -> Aggregator:
    """Build the aggregator ``spec`` names; errors name ``path`` and the bad parameter."""
    cls = AGGREGATORS.get(spec.name)
    bind_params(cls, spec.params, path)
    try:
        return cls(**spec.params)
    except (TypeError, ValueError) as err:
        raise ConfigError(path, str(err)) from None


def describe(spec: Spec) -> dict[str, Any]:
    """How the summary names the aggregator."""
    return {"name": spec.name, **spec.params}
