"""DS-FL, distillation-based semi-supervised FL (Itahara et al., IEEE TMC 2021,
arXiv:2008.06180): soft labels on an unlabelled open set, sharpened at the server
by entropy reduction aggregation (ERA).

Each round a client (1) trains on its private data, (2) sends its softmax outputs
on the round's open-set subset; the server (3) averages them and applies ERA,
``softmax(mean_k(p_k) / T)`` with a small temperature T (< 1 sharpens), which
lowers the entropy of the global soft labels and so the damage from non-IID
disagreement; (4) clients and the server's global model distil towards the ERA
labels on the open set. ``era = false`` sends the plain average (the paper's SA
ablation).

Deviations: step (4) on the client happens at the start of the next round's
message, just before step (1), so the sequence of steps is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import Payload, SoftLabels
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
class DSFLParams:
    era_temperature: float = 0.1  # T of ERA; < 1 sharpens
    era: bool = True  # false: simple averaging (SA)
    distill_epochs: int = 2  # client epochs over the open set per round

    def __post_init__(self) -> None:
        if self.era_temperature <= 0:
            raise ConfigError("era_temperature", f"must be > 0, got {self.era_temperature}")
        if self.distill_epochs < 0:
            raise ConfigError("distill_epochs", f"must be >= 0, got {self.distill_epochs}")


def era(mean_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Entropy reduction aggregation: ``softmax(mean_probs / temperature)`` per row."""
    z = mean_probs.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@CLIENT_STRATEGIES.register("dsfl")
class DSFLClient(ClientStrategy):
    Params = DSFLParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        out = {}
        if isinstance(targets, SoftLabels) and self.params.distill_epochs:
            out["distill"] = node.distill_public(targets, epochs=self.params.distill_epochs)["kd"]
        out.update(node.train_private())
        return out

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return node.public_probs(public_idx)


@SERVER_STRATEGIES.register("dsfl")
class DSFLServer(ServerStrategy):
    Params = DSFLParams
    client_strategy = DSFLClient
    accepts = (SoftLabels,)
    uses_aggregator = True

    def aggregates_by_mean(self) -> bool:
        return True  # ERA post-processes the mean

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        mean = server.combine({c: p for c, p in payloads.items() if isinstance(p, SoftLabels)})
        if not self.params.era:
            return mean
        return SoftLabels(mean.idx, era(mean.probs, self.params.era_temperature))

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, SoftLabels)
        return server.distill_teacher(aggregate, temperature=1.0)
