"""Pure functions of the config that decide, per client and per round, what the
runtime builds: the student architecture, the configured loss list, the round's
sample of clients, and the device. Low in the import graph: nodes, strategies and
the runtime all read them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedkd.config import Config, Spec, parse_id_range
from fedkd.seeding import derive_seed


def student_spec(config: Config, cid: int) -> Spec:
    """Client ``cid``'s architecture: an explicit ``clients.model_groups`` range,
    else round-robin over ``clients.models``."""
    for key, spec in config.clients.model_groups.items():
        if cid in parse_id_range(key, config.clients.count, "clients.model_groups"):
            return spec
    return config.clients.models[cid % len(config.clients.models)]


def client_losses(config: Config, cid: int) -> tuple[Any, str] | None:
    """Client ``cid``'s configured training loss list and its config path
    (``strategy.losses``, or ``clients.strategies.<range>.losses`` where an explicit
    entry sets one); None when neither does (the strategy's own loss)."""
    for key, spec in config.clients.strategies.items():
        if cid in parse_id_range(key, config.clients.count, "clients.strategies"):
            if "losses" in spec.params:
                return spec.params["losses"], f"clients.strategies.{key}.losses"
            break
    if "losses" in config.strategy.params:
        return config.strategy.params["losses"], "strategy.losses"
    return None


def clients_per_round(config: Config) -> int:
    """How many clients a round samples (``clients.fraction`` of ``clients.count``)."""
    n = config.clients.count
    return min(n, max(1, round(config.clients.fraction * n)))


def clients_per_message(config: Config, workers: int) -> int:
    """How many clients one train message carries: ``simulation.clients_per_message``;
    auto (0): 1, or, with ``simulation.vectorize``, a round's clients split evenly over
    the ``workers`` that run at once (so each worker trains its share together)."""
    sim = config.simulation
    if sim.clients_per_message:
        return sim.clients_per_message
    if not sim.vectorize:
        return 1
    return -(-clients_per_round(config) // max(1, workers))


def sample_clients(config: Config, rnd: int) -> list[int]:
    """Clients sampled in round ``rnd`` (``clients.fraction`` of them, seeded)."""
    n = config.clients.count
    k = clients_per_round(config)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(config.seed, "sample", rnd))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def resolve_device(config: Config) -> torch.device:
    """``cuda`` when asked for, or when ``auto`` and this process sees a GPU."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
