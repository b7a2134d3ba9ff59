"""Misbehaving strategies, loaded by import path from test configs (as a user's would be)."""

from __future__ import annotations

import numpy as np

from fedkd.payloads import Logits, Payload
from fedkd.strategy import ClientNode, Metrics, ServerNode
from strategies.kd import KDClient, KDServer


class ExplodingClient(KDClient):
    """Raises during round 2."""

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        if node.round == 2:
            raise RuntimeError(f"client {node.cid} exploded on purpose")
        return super().train(node, targets)


class NaNClient(KDClient):
    """Sends logits with a NaN in them."""

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        payload = super().predict(node, public_idx)
        values = payload.values.copy()
        values[0, 0] = np.nan
        return Logits(payload.idx, values)


class CrashingServer(KDServer):
    """Fails while aggregating round 2."""

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        if server.round == 2:
            raise RuntimeError("server crashed on purpose")
        return super().aggregate(server, payloads)
