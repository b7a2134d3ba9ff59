"""A lab's own federated distillation algorithm, outside fedkd, selected by import path.

``MedianKD`` is a server strategy: the teacher distils towards the coordinate-wise
*median* of the clients' public logits (robust to a minority of bad clients), and
clients learn from the teacher as in fedkd's ``kd``. ``LabelFlipper`` is a client
strategy that poisons what it shares by training on shifted labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import Logits, Payload
from fedkd.strategy import ClientNode, ClientStrategy, Metrics, ServerNode, ServerStrategy


@dataclass(frozen=True)
class MedianParams:
    temperature: float = 3.0
    kd_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


class MedianClient(ClientStrategy):
    Params = MedianParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = targets if isinstance(targets, Logits) else None
        p = self.params
        return node.train_private(kd=kd, kd_weight=p.kd_weight, temperature=p.temperature)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return Logits(public_idx, node.public_logits(public_idx))


class MedianKD(ServerStrategy):
    Params = MedianParams
    client_strategy = MedianClient
    accepts = (Logits,)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        logits = [p for p in payloads.values() if isinstance(p, Logits)]
        median = np.median(np.stack([p.values for p in logits]), axis=0)
        return Logits(logits[0].idx, median.astype(np.float32))

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, Logits)
        return server.distill_teacher(aggregate, temperature=self.params.temperature)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        return server.teacher_logits(public_idx)


@dataclass(frozen=True)
class FlipParams:
    shift: int = 1  # label c is learned as (c + shift) mod classes


class LabelFlipper(ClientStrategy):
    Params = FlipParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        wrong = (node.y + self.params.shift) % node.num_classes
        return node.train_on(node.x, wrong)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return Logits(public_idx, node.public_logits(public_idx))
