"""Federated deep mutual learning (DML).

Paper: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018
(arXiv:1706.00384). A cohort of K students trains together, none of them a
pre-trained teacher: each student k minimises cross-entropy on the labels plus the
KL divergence from each peer's predictions on the same inputs, averaged over peers,

    L_k = L_C(p_k) + 1/(K-1) * sum_{l != k} KL(p_l || p_k),    (temperature 1)

with the peers' predictions held fixed while k is updated.

The maths used here: ``KL(p_l || p_k) = H(p_l, p_k) - H(p_l)`` and the cross-entropy
``H(q, p_k) = -sum_c q_c log p_k,c`` is linear in ``q``, so with the mean of the peers'
*probabilities* ``m = 1/(K-1) * sum_{l != k} p_l``::

    1/(K-1) * sum_{l != k} KL(p_l || p_k) = KL(m || p_k) + H(m) - 1/(K-1) * sum_l H(p_l)

The last two terms do not depend on student k (their difference is the Jensen gap
of the entropy, >= 0), so DML's mutual term has exactly the gradients of one KL
towards the mean of the peers' probabilities, which is what fedkd's ``prob_kl`` loss
computes. (This is not true of the mean of the peers' *logits*: ``softmax`` of a mean
logit is another target with other gradients.) So peers send softmax probabilities
(:class:`~fedkd.payloads.SoftLabels`), and the server averages probabilities.

Federated adaptation (not in the paper, which trains all students on one machine on
the same mini-batches):

- peers exchange predictions on the round's public subset (as fedkd's ``kd`` with
  ``targets = "ensemble"`` and FedMD do), never their private data or weights;
- the server sends each client the leave-one-out mean of the *other* clients'
  probabilities (:meth:`DMLServer.client_targets`), so a client learns from its
  peers and never from its own output. The peers are the clients whose payload
  arrived (and was valid) in the previous round: under client sampling, dropout or
  failures the cohort is whoever replied, and a client that did not reply learns
  from all of them; a client with no peer (alone in its round) trains on CE only;
- the client trains on its private data with ``(1 - kd_weight) * CE + kd_weight *
  KL(m || p_k)``, the KL on a random public batch (of the targets' samples) paired
  with each private batch (``node.train_private``, the runtime's loop); DML applies
  both terms to the same batch of labelled data;
- the peers' predictions are one round old (computed after their previous round's
  training) rather than from the current step: the paper alternates updates step by
  step;
- DML's loss is ``CE + KL`` (weight 1 each): ``kd_weight = 0.5`` (the default) gives
  the same direction at half the scale, ``0.5 * (CE + KL)``, a factor 2 absorbed in
  the step size (Adam is invariant to it up to its epsilon);
- round 1 has no peer predictions yet: plain cross-entropy;
- ``temperature`` (default 1, the paper's) softens both sides: peers send
  ``softmax(z / T)`` and the KL is taken at T, scaled by T^2.

The server holds no model (``uses_teacher = False``); the mean is a plain one
(``server.aggregator`` does not apply, and central client-level DP, which hands the
strategy one noisy mean of all clients, is refused: use ``privacy.mode = "local"``).
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
from fedkd.vectorize import train_private_group

#: where the server keeps the last round's peers: (sum of their probabilities, received)
STATE_KEY = "dml"


@dataclass(frozen=True)
class DMLParams:
    kd_weight: float = 0.5  # weight of the mutual (KL) term; 1 - kd_weight goes to CE
    temperature: float = 1.0  # softmax temperature of peers' predictions and the KL (paper: 1)

    def __post_init__(self) -> None:
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


def leave_one_out(
    total: np.ndarray, received: dict[int, SoftLabels], cid: int
) -> SoftLabels | None:
    """The mean of the probabilities in ``received`` except client ``cid``'s own
    (``total``: their float64 sum over all of ``received``); None when no peer is left."""
    if not received:
        return None
    own = received.get(cid)
    peers = len(received) - (own is not None)
    if peers == 0:
        return None
    rest = total - own.probs.astype(np.float64) if own is not None else total
    mean = np.clip(rest / peers, 0.0, None)  # subtraction may leave tiny negatives
    mean /= mean.sum(axis=1, keepdims=True)
    idx = next(iter(received.values())).idx
    return SoftLabels(idx.copy(), mean.astype(np.float32))


@CLIENT_STRATEGIES.register("dml")
class DMLClient(ClientStrategy):
    """CE on private data plus KL towards the peers' mean probabilities (from round 2)."""

    Params = DMLParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        p = self.params
        kd = targets if isinstance(targets, SoftLabels) else None
        return node.train_private(
            kd=kd, kd_weight=p.kd_weight, temperature=p.temperature, loss="prob_kl"
        )

    def train_group(self, nodes: list[ClientNode], targets: Payload | None) -> list[Metrics]:
        """:meth:`train` vectorised over clients of one architecture (``simulation.vectorize``)."""
        p = self.params
        kd = targets if isinstance(targets, SoftLabels) else None
        return train_private_group(
            nodes, kd=kd, kd_weight=p.kd_weight, temperature=p.temperature, loss="prob_kl"
        )

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return node.public_probs(public_idx, self.params.temperature)


@SERVER_STRATEGIES.register("dml")
class DMLServer(ServerStrategy):
    """Collects the cohort's probabilities; sends each client its peers' mean."""

    Params = DMLParams
    client_strategy = DMLClient
    uses_teacher = False
    accepts = (SoftLabels,)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        received = {c: p for c, p in payloads.items() if isinstance(p, SoftLabels)}
        total = np.sum([p.probs.astype(np.float64) for p in received.values()], axis=0)
        server.state[STATE_KEY] = (total, received)
        return SoftLabels.mean(list(received.values()))

    def client_targets(
        self, server: ServerNode, cid: int, targets: Payload | None
    ) -> Payload | None:
        """The mean probabilities of last round's peers of ``cid`` (all who replied but
        ``cid``); None in round 1, or when ``cid`` has no peer."""
        if targets is None or STATE_KEY not in server.state:
            return None
        total, received = server.state[STATE_KEY]
        return leave_one_out(total, received, cid)
