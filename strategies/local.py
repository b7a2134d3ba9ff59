"""Local-only training: no federation. The baseline every KD method must beat."""

from __future__ import annotations

import numpy as np

from fedkd.payloads import Payload
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
)
from fedkd.vectorize import train_private_group


@CLIENT_STRATEGIES.register("local")
class LocalClient(ClientStrategy):
    """Trains on private data only and sends nothing."""

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        return node.train_private()

    def train_group(self, nodes: list[ClientNode], targets: Payload | None) -> list[Metrics]:
        """:meth:`train` vectorised over clients of one architecture (``simulation.vectorize``)."""
        return train_private_group(nodes)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        return None


@SERVER_STRATEGIES.register("local")
class LocalServer(ServerStrategy):
    """Receives nothing, holds no teacher."""

    client_strategy = LocalClient
    uses_teacher = False
    clients_use_public = False

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        return None
