"""CFD, compressed federated distillation (Sattler et al., IEEE TNSE 2021,
arXiv:2012.00632): soft labels quantized to a few bits, with dual distillation.

Each round a client distils towards the server's soft labels on the public
subset, trains on its private data, and uploads its softmax outputs on the
round's public subset quantized to ``bits`` bits per entry (the paper's
constrained uniform quantizer, see :class:`~fedkd.payloads.QuantizedSoftLabels`;
bit-packed, and communication counts the packed size). The server averages the
dequantized labels, distils its model on the average, and sends the server
model's own soft labels on the next public subset, quantized to ``down_bits``
(32: float32, unquantized). The defaults, 1 bit both ways, are those of the authors'
experiments (``quantization_bits = quantization_bits_down = 1`` in the ``exec.sh`` of
github.com/felisat/fl_distill_communication_efficient; the paper's text was not
reachable to check its own table).

Deviations: no delta coding and arithmetic coding of successive soft labels (the
paper's lossless further compression, which needs a fixed distillation subset);
clients' students start from their own seeds, not one common initialisation.
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
    bits: int = 1  # upstream bits per soft-label entry (1 = one-hot argmax)
    down_bits: int = 1  # downstream bits per entry (1: one-hot); 32 = float32, unquantized
    distill_epochs: int = 2  # client epochs over the public subset per round

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ConfigError("bits", f"must be in 1..16, got {self.bits}")
        if not (1 <= self.down_bits <= 16 or self.down_bits == 32):
            raise ConfigError("down_bits", f"must be in 1..16, or 32, got {self.down_bits}")
        if self.distill_epochs < 0:
            raise ConfigError("distill_epochs", f"must be >= 0, got {self.distill_epochs}")


def as_soft_labels(payload: Payload | None) -> SoftLabels | None:
    if isinstance(payload, QuantizedSoftLabels):
        return payload.soft_labels()
    return payload if isinstance(payload, SoftLabels) else None


@CLIENT_STRATEGIES.register("cfd")
class CFDClient(ClientStrategy):
    Params = CFDParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        out, labels = {}, as_soft_labels(targets)
        if labels is not None and self.params.distill_epochs:
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
    uses_aggregator = True

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        quantized = QuantizedSoftLabels
        labels = {c: p.soft_labels() for c, p in payloads.items() if isinstance(p, quantized)}
        return server.combine(labels)

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, SoftLabels)
        return server.distill_teacher(aggregate, temperature=1.0)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        """The server model's soft labels on the next subset (dual distillation)."""
        if server.teacher_updates == 0:
            return None  # nothing learned yet: an untrained model is no target
        assert server.teacher is not None
        labels = server.soft_labels(server.teacher, public_idx)
        if self.params.down_bits == 32:
            return labels
        return QuantizedSoftLabels.quantize(labels, self.params.down_bits)
