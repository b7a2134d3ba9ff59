"""CFD, compressed federated distillation (Sattler et al., 2020, arXiv:2012.00632):
soft labels quantized to a few bits in both directions.

Each round a client distils towards the server's (dequantized) aggregate soft
labels on the public subset, trains on its private data, and uploads its softmax
outputs on the round's public subset quantized to ``bits`` bits per entry
(deterministic rounding to ``2**bits - 1`` levels, bit-packed). The server
dequantizes and averages them, distils its model on the average, and broadcasts
the average quantized to ``down_bits`` bits. Communication counts the packed size.

Deviations: no delta coding / entropy coding of successive soft labels (the
paper's further compression), and no active selection of distillation data:
the public subset per round is ``server.public_subset`` drawn at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import Payload, QuantizedSoftLabels, SoftLabels
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
)


@dataclass(frozen=True)
class CFDParams:
    bits: int = 2  # upstream bits per soft-label entry
    down_bits: int = 8  # downstream bits per entry
    distill_epochs: int = 2  # client epochs over the public subset per round

    def __post_init__(self) -> None:
        for name in ("bits", "down_bits"):
            if not 1 <= getattr(self, name) <= 16:
                raise ConfigError(name, f"must be in 1..16, got {getattr(self, name)}")
        if self.distill_epochs < 0:
            raise ConfigError("distill_epochs", f"must be >= 0, got {self.distill_epochs}")


@CLIENT_STRATEGIES.register("cfd")
class CFDClient(ClientStrategy):
    Params = CFDParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        out = {}
        if isinstance(targets, QuantizedSoftLabels) and self.params.distill_epochs:
            labels = targets.soft_labels()
            out["distill"] = node.distill_public(labels, epochs=self.params.distill_epochs)["kd"]
        out.update(node.train_private())
        return out

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return QuantizedSoftLabels.quantize(node.public_probs(public_idx), self.params.bits)


@SERVER_STRATEGIES.register("cfd")
class CFDServer(ServerStrategy):
    Params = CFDParams
    client_strategy = CFDClient
    accepts = (QuantizedSoftLabels,)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        labels = [p.soft_labels() for p in payloads.values() if isinstance(p, QuantizedSoftLabels)]
        return SoftLabels.mean(labels)

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, SoftLabels)
        return server.distill_teacher(aggregate, temperature=1.0)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        if not isinstance(aggregate, SoftLabels):
            return None
        return QuantizedSoftLabels.quantize(aggregate, self.params.down_bits)
