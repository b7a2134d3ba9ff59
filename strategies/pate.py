"""PATE-style private aggregation (Papernot et al., ICLR 2017 and 2018): the clients
are the teacher ensemble, the server's model is the student.

Each round every sampled client trains on its private data (mixed with distillation
towards the previous round's released labels) and votes, with its argmax, on the
round's public subset (``server.public_subset`` queries). The server counts the
votes per query and releases GNMax labels, ``argmax_j(n_j + N(0, sigma^2))``; with
``confident = true`` (Confident-GNMax) a query is answered only if
``max_j n_j + N(0, sigma1^2) >= threshold * voters``. The released labels train the
server's model and are sent back as one-hot targets (post-processing).

Privacy: the data-independent RDP bound, ``alpha / sigma^2`` per answered query and
``alpha / (2 sigma1^2)`` per threshold check, composed over rounds and converted
to (epsilon, ``privacy.delta``). Changing one client's data, or all of it, changes
only its own vote on each query, so the bound holds per client (client-level) and
so per record. Deviations: the data-dependent (smooth sensitivity) analysis of the
2018 paper, which gives much smaller epsilons when teachers agree, is not done;
with a handful of clients as teachers the noise must stay small, so epsilons are
large (PATE needs hundreds of teachers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.payloads import Payload, SoftLabels, Votes
from fedkd.privacy import NoiseSource
from fedkd.privacy.accounting import gnmax_rdp, rdp_epsilon
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
class PATEParams:
    sigma: float = 2.0  # GNMax noise std on the vote counts
    confident: bool = True  # Confident-GNMax: answer only clear majorities
    threshold: float = 0.6  # share of the voting clients the noisy maximum must reach
    sigma1: float = 1.5  # noise std of the threshold check
    kd_weight: float = 0.3  # clients: weight of distillation towards the released labels

    def __post_init__(self) -> None:
        for name in ("sigma", "sigma1"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")


def queries_per_round(config: Config) -> int:
    k = config.server.public_subset
    return config.data.public if k == 0 else k


def round_rdp(config: Config, p: PATEParams) -> np.ndarray:
    """Worst case per round: every query answered (and checked)."""
    q = queries_per_round(config)
    return gnmax_rdp(q, q if p.confident else 0, p.sigma, p.sigma1 if p.confident else None)


@CLIENT_STRATEGIES.register("pate")
class PATEClient(ClientStrategy):
    Params = PATEParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = targets if isinstance(targets, SoftLabels) and len(targets.idx) else None
        return node.train_private(kd=kd, kd_weight=self.params.kd_weight)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        labels = node.public_logits(public_idx).argmax(1).astype(np.int16)
        return Votes(np.asarray(public_idx), labels)


@SERVER_STRATEGIES.register("pate")
class PATEServer(ServerStrategy):
    Params = PATEParams
    client_strategy = PATEClient
    accepts = (Votes,)
    own_privacy = True

    @classmethod
    def check_config(cls, config: Config) -> None:
        target = config.privacy.target_epsilon
        params = PATEParams(**{k: v for k, v in config.strategy.params.items()})
        if target > 0:
            eps = rdp_epsilon(round_rdp(config, params), config.privacy.delta)
            if eps > target:
                raise ConfigError(
                    "privacy.target_epsilon",
                    f"cannot be met: one PATE round of {queries_per_round(config)} queries "
                    f"may spend epsilon = {eps:.3g}; raise strategy.sigma or lower "
                    "server.public_subset",
                )

    def setup(self, server: ServerNode) -> None:
        assert server.privacy is not None
        server.privacy.expect_rdp_per_round(round_rdp(server.config, self.params))
        self.noise = NoiseSource(server.config.seed, server.config.privacy.secure_noise)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        votes = [p for p in payloads.values() if isinstance(p, Votes)]
        idx = votes[0].idx
        counts = np.zeros((len(idx), server.num_classes))
        for v in votes:
            counts[np.arange(len(idx)), v.labels] += 1
        p, rnd = self.params, server.round
        answered = np.ones(len(idx), dtype=bool)
        if p.confident:
            check = counts.max(1) + self.noise.normal((len(idx),), p.sigma1, "pate-check", rnd)
            answered = check >= p.threshold * len(votes)
        noisy = counts + self.noise.normal(counts.shape, p.sigma, "pate-gnmax", rnd)
        labels = noisy.argmax(1)[answered]
        assert server.privacy is not None
        checks = len(idx) if p.confident else 0
        server.privacy.add_rdp(
            gnmax_rdp(int(answered.sum()), checks, p.sigma, p.sigma1 if p.confident else None)
        )
        server.state["answered"] = int(answered.sum())
        one_hot = np.eye(server.num_classes, dtype=np.float32)[labels]
        return SoftLabels(np.asarray(idx)[answered], one_hot)

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, SoftLabels)
        out: Metrics = {"answered": float(server.state["answered"])}
        if len(aggregate.idx):
            out.update(server.distill_teacher(aggregate, temperature=1.0))
        return out
