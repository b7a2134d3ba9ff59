"""FD, federated distillation (Jeong et al., 2018, arXiv:1811.11479): per-class mean
logits, no public set.

Each client sends, for every label, the mean softmax output ("logit vector
normalized by the softmax function" in the paper) of its private samples of that
label, accumulated over the outputs its model produced during the round's local
training (the paper's Algorithm 1 as described to us: every training step adds its
output to its label's sum; ``collect = "after"`` instead uses the end-of-round model
in eval mode).
The server averages each label's vectors over the clients that hold the label. A
client then trains with cross-entropy plus a distillation regulariser, the
cross-entropy between its output on a private sample of label c and the global mean
output for c excluding its own contribution (the paper's
``(sum_j F_j - F_i) / (M - 1)``, divided here by the number of *other clients that
hold label c*; the two agree when every client holds every label). The server
computes that leave-one-out mean per client, so each client downloads one
(classes x classes) matrix.

Deviations: the loss is ``(1 - kd_weight) * CE + kd_weight * KD`` (the paper's
``CE + gamma * KD`` with ``gamma = kd_weight / (1 - kd_weight)``, up to the step
size); KD is the KL divergence, which has the soft cross-entropy's gradients.
Options beyond the paper: ``softmax = false`` exchanges raw mean logits (then KD is
T^2-scaled KL at ``temperature``), ``weighted = true`` averages by sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import ClassLogits, Payload
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
class FDParams:
    kd_weight: float = 0.3  # weight of the regulariser; 1 - kd_weight goes to cross-entropy
    softmax: bool = True  # exchange mean probabilities (paper); false: mean raw logits
    temperature: float = 1.0  # KD temperature, used when softmax = false
    exclude_own: bool = True  # leave each client's own vectors out of its targets
    weighted: bool = False  # average per-class vectors by sample count, not per client
    # when the per-class vectors are collected: "training" (the paper: outputs of the
    # local training steps) or "after" (one eval-mode pass of the trained model)
    collect: str = "training"

    def __post_init__(self) -> None:
        if self.collect not in ("training", "after"):
            raise ConfigError("collect", f'must be "training" or "after", got {self.collect!r}')
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")


@CLIENT_STRATEGIES.register("fd")
class FDClient(ClientStrategy):
    Params = FDParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        p = self.params
        self.means = node.class_means(p.softmax) if p.collect == "training" else None
        return node.train_private(
            kd=targets if isinstance(targets, ClassLogits) else None,
            kd_weight=p.kd_weight,
            temperature=1.0 if p.softmax else p.temperature,
            loss="prob_kl" if p.softmax else "soft_kl",
            class_means=self.means,
        )

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        if getattr(self, "means", None) is None:
            return node.class_mean_logits(softmax=self.params.softmax)
        return ClassLogits(*self.means.means())


def class_average(payloads: dict[int, ClassLogits], weighted: bool) -> tuple[np.ndarray, ...]:
    """Per-class (weighted sum of means, total weight) over clients; a client's weight for
    class c is its sample count (``weighted``) or 1, and 0 where it has no sample of c."""
    sums, mass = 0.0, 0.0
    for p in payloads.values():
        w = p.counts.astype(np.float64) if weighted else (p.counts > 0).astype(np.float64)
        sums = sums + w[:, None] * p.means.astype(np.float64)
        mass = mass + w
    return np.asarray(sums), np.asarray(mass)


def _mean(sums: np.ndarray, mass: np.ndarray) -> ClassLogits:
    means = sums / np.maximum(mass, 1e-12)[:, None]
    means[mass <= 1e-12] = 0.0
    return ClassLogits(means.astype(np.float32), mass.astype(np.float32))


@SERVER_STRATEGIES.register("fd")
class FDServer(ServerStrategy):
    Params = FDParams
    client_strategy = FDClient
    uses_teacher = False
    clients_use_public = False
    accepts = (ClassLogits,)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        received = {c: p for c, p in payloads.items() if isinstance(p, ClassLogits)}
        sums, mass = class_average(received, self.params.weighted)
        server.state["fd"] = (sums, mass, received)
        return _mean(sums, mass)

    def client_targets(self, server: ServerNode, cid: int, targets: Payload | None):
        """The global per-class means without client ``cid``'s own last contribution."""
        if targets is None or not self.params.exclude_own or "fd" not in server.state:
            return targets
        sums, mass, received = server.state["fd"]
        own = received.get(cid)
        if own is None:
            return targets
        w = own.counts.astype(np.float64) if self.params.weighted else (own.counts > 0) * 1.0
        return _mean(sums - w[:, None] * own.means, mass - w)
