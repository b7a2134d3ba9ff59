"""Public-set logit distillation with a global teacher (FedMD-style round).

Each round a client mixes cross-entropy on its private data with distillation
towards the server's targets on public inputs (KL at temperature T, scaled by
T^2, weight ``kd_weight``), then sends its logits on the round's public subset.
The server averages the logits (weighted by private-set size if asked), distils
its teacher on them, and sends the teacher's logits (or the plain average) as the
next round's targets.

Related work: FedMD (Li & Wang, 2019, arXiv:1910.03581) digests the consensus and
revisits private data in two phases; here both are one joint loss, as in
Hinton et al.'s (2015) KD objective. ``strategies/fedmd.py`` is the faithful one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import Logits, Payload
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


@dataclass(frozen=True)
class KDParams:
    temperature: float = 3.0  # softmax temperature T of the KD term
    kd_weight: float = 0.5  # weight of the KD term; 1 - kd_weight goes to cross-entropy
    targets: str = "teacher"  # "teacher": teacher logits; "ensemble": averaged client logits
    weighted: bool = False  # weight client logits by private-set size when averaging

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")
        if self.targets not in ("teacher", "ensemble"):
            raise ConfigError("targets", f"must be 'teacher' or 'ensemble', got {self.targets!r}")


@CLIENT_STRATEGIES.register("kd")
class KDClient(ClientStrategy):
    Params = KDParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = targets if isinstance(targets, Logits) else None
        p = self.params
        return node.train_private(kd=kd, kd_weight=p.kd_weight, temperature=p.temperature)

    def train_group(self, nodes: list[ClientNode], targets: Payload | None) -> list[Metrics]:
        """:meth:`train` vectorised over clients of one architecture (``simulation.vectorize``)."""
        kd = targets if isinstance(targets, Logits) else None
        p = self.params
        return train_private_group(nodes, kd=kd, kd_weight=p.kd_weight, temperature=p.temperature)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return Logits(public_idx, node.public_logits(public_idx))


@SERVER_STRATEGIES.register("kd")
class KDServer(ServerStrategy):
    Params = KDParams
    client_strategy = KDClient
    accepts = (Logits,)
    uses_aggregator = True

    def aggregates_by_mean(self) -> bool:
        return not self.params.weighted

    def target_features(self) -> frozenset[str]:
        """The teacher model's targets can carry its embeddings (for hint / RKD losses)."""
        if self.params.targets == "ensemble":
            return frozenset({"logits"})
        return frozenset({"logits", "embedding"})

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        logits = {cid: p for cid, p in payloads.items() if isinstance(p, Logits)}
        weights = None
        if self.params.weighted:
            weights = [server.num_examples[cid] for cid in logits]
        return server.combine(logits, weights)

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, Logits)
        return server.distill_teacher(aggregate, temperature=self.params.temperature)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        if self.params.targets == "ensemble":
            return aggregate
        if server.teacher_updates == 0:
            return None  # nothing learned yet: an untrained teacher is no target
        return server.teacher_logits(public_idx)
