"""Preflight: refuse, before round 1, client strategies that touch sealed private data.

Under a training-time mechanism (DP-SGD) every distinct client strategy runs its
hooks once on a synthetic, sealed client (:mod:`fedkd.privacy.guard`), so most
violations become a :class:`~fedkd.config.ConfigError` before any budget is spent;
those it cannot reach still meet the seal at run time.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkd.assignment import client_losses, student_spec
from fedkd.client_node import ClientNode
from fedkd.config import Config, ConfigError, parse_id_range
from fedkd.kd.step import RoutedLoss
from fedkd.models import build_model
from fedkd.privacy.accounting import PrivacyError
from fedkd.privacy.guard import check_untampered, sealed
from fedkd.seeding import derive_seed
from fedkd.selection import client_strategy
from fedkd.training import make_optimizer

if TYPE_CHECKING:
    from fedkd.data import FederatedData
    from fedkd.strategy import ClientStrategy


@contextmanager
def _own_randomness() -> Iterator[None]:
    """Leave torch's, NumPy's and Python's global random states as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _probe_node(
    config: Config, data: FederatedData, cid: int, strategy: ClientStrategy, rows: int = 16
) -> ClientNode:
    """A throwaway, sealed client of ``cid``'s architecture on random data of the real
    shapes (the private data is never touched, so no budget is spent)."""
    rng = np.random.default_rng(derive_seed(config.seed, "preflight", cid))
    shape, classes = data.input_shape, data.num_classes

    def inputs() -> torch.Tensor:
        x = rng.standard_normal((rows, *shape)).astype(data.private_x.dtype)
        return torch.from_numpy(x)

    def labels() -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, classes, rows).astype(data.private_y.dtype))

    model = build_model(student_spec(config, cid), shape, classes, seed=0)
    return ProbeNode(
        cid=cid,
        round=1,
        model=model,
        optimizer=make_optimizer(config.clients.optimizer, model, config.clients.lr),
        x=inputs(),
        y=labels(),
        public_x=inputs(),
        public_y=labels(),
        test_x=inputs(),
        test_y=labels(),
        num_classes=classes,
        settings=dataclasses.replace(config.clients, local_epochs=1),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        privacy=config.privacy,
        seed=config.seed,
        strategy_name=type(strategy).__name__,
        losses=_probe_losses(config, cid),
    )


def _probe_losses(config: Config, cid: int) -> Any:
    """The client's configured training loss (``strategy.losses``), as the runtime builds it."""
    configured = client_losses(config, cid)
    return None if configured is None else RoutedLoss.from_config(*configured)


def _probe(config: Config, data: FederatedData, cid: int, strategy: ClientStrategy) -> None:
    """Call the strategy's hooks once on a probe node; only PrivacyError escapes."""
    node = _probe_node(config, data, cid, strategy)
    hooks = [
        lambda: strategy.setup(node),
        lambda: strategy.train(node, None),
        lambda: strategy.predict(node, np.arange(len(node.public_x))),
    ]
    for hook in hooks:
        try:
            hook()
        except PrivacyError:
            raise
        except Exception:  # not a privacy finding: the real round reports it
            continue


def preflight(config: Config, data: FederatedData) -> None:
    """Refuse, before round 1, client strategies that touch sealed private data.

    Under a training-time mechanism every distinct client strategy (class and params)
    runs ``setup``, ``train(node, None)`` and ``predict`` once on a synthetic client;
    a :class:`PrivacyError` becomes a :class:`ConfigError` on ``privacy.mechanism``
    (or on the ``clients.strategies`` range that chose the class). Global random
    states are left as they were. Without such a mechanism, nothing runs.
    """
    if not sealed(config.privacy):
        return
    probes: dict[tuple[type, str, str], tuple[ClientStrategy, int, str]] = {}
    ranges = config.clients.strategies
    for cid in range(config.clients.count):
        strategy = client_strategy(config, cid)
        key = (type(strategy), repr(strategy.params), repr(client_losses(config, cid)))
        if key not in probes:
            source = next(
                (k for k in ranges if cid in parse_id_range(k, config.clients.count, "")), None
            )
            field = "privacy.mechanism" if source is None else f"clients.strategies.{source}"
            probes[key] = (strategy, cid, field)
    with _own_randomness():
        for strategy, cid, field in probes.values():
            try:
                _probe(config, data, cid, strategy)
            except PrivacyError as err:
                raise ConfigError(
                    field,
                    f"client strategy {type(strategy).__name__} cannot run under "
                    f"privacy.mechanism = {config.privacy.mechanism!r}: a probe on synthetic "
                    f"data (before round 1, spending no privacy budget) stopped it: {err}",
                ) from None


class ProbeNode(ClientNode):
    """A client whose DP-SGD only checks what it would train (no Opacus, no budget)."""

    def _dp_sgd(self, epochs: int) -> dict[str, float]:
        check_untampered(self)
        return {"ce": 0.0, "dp_steps_round": 1.0}
