"""Misbehaving strategies, loaded by import path from test configs (as a user's would be)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedkd.payloads import ClassLogits, Logits, Payload, SoftLabels
from fedkd.strategy import ClientNode, Metrics, ServerNode
from strategies.cronus import CronusClient
from strategies.fd import FDClient
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


class WrongShapeClassLogits(FDClient):
    """Sends per-class means with one class column missing."""

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        payload = super().predict(node, public_idx)
        assert isinstance(payload, ClassLogits)
        return ClassLogits(payload.means[:, :-1].copy(), payload.counts)


class WrongKindClient(KDClient):
    """Sends logits to a server that accepts soft labels only."""


class AdversarialSoftLabels(CronusClient):
    """Poisons the public soft labels: all mass on a wrong class."""

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        honest = node.public_probs(public_idx)
        wrong = (honest.probs.argmax(1) + 1) % node.num_classes
        return SoftLabels(honest.idx, np.eye(node.num_classes, dtype=np.float32)[wrong])


class AlwaysRaisingClient(KDClient):
    """Raises in every round."""

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        raise ValueError(f"client {node.cid} always fails")


class NdarrayPredictClient(KDClient):
    """Breaks the predict contract: returns a bare ndarray instead of a payload."""

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return node.public_logits(public_idx)  # type: ignore[return-value]


class NoneTrainClient(KDClient):
    """Breaks the train contract: returns None instead of a metrics dict."""

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        super().train(node, targets)
        return None  # type: ignore[return-value]


class UndecodableTargetsServer(KDServer):
    """Sends targets of a payload kind that only the server process knows: it registers
    the kind in ``setup``, which runs in the driver, never in a client worker."""

    def setup(self, server: ServerNode) -> None:
        from fedkd.payloads import PAYLOADS

        if "server_only_logits" not in PAYLOADS:
            PAYLOADS.register("server_only_logits")(ServerOnlyLogits)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        if not isinstance(aggregate, Logits):
            return None
        return ServerOnlyLogits(aggregate.idx, aggregate.values)


@dataclass(frozen=True)
class ServerOnlyLogits(Logits):
    """Registered as a payload kind by UndecodableTargetsServer.setup only."""

    kind: ClassVar[str] = "server_only_logits"
