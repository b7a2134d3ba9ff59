"""PATE, private aggregation of teacher ensembles (Papernot et al., ICLR 2017, "Semi-supervised
Knowledge Transfer for Deep Learning from Private Training Data", and ICLR 2018, "Scalable
Private Learning with PATE"; authors' code: github.com/tensorflow/privacy,
``research/pate_2017`` and ``research/pate_2018``). The clients are the teacher ensemble,
the server's model is the student.

``mode = "one_shot"`` (default, the papers' protocol): every round the clients (teachers)
train on their private data only, each on its own disjoint partition; in rounds before
the last they are asked nothing, send nothing and spend no privacy. In the last round
(``rounds``) each votes, with its argmax, on that round's public subset: a fixed, seeded
set of ``server.public_subset`` queries (the whole public set if 0). The server answers
them once with GNMax, ``argmax_j(n_j + N(0, sigma^2))``, or, with ``confident = true``
(Confident-GNMax), only where ``max_j n_j + N(0, sigma1^2) >= threshold * voters``, and
trains the student on the answered labels (``server.epochs``). Every teacher must vote:
``clients.fraction`` must select all clients. ``kd_weight`` is not used.

``mode = "per_round"``: fedkd's earlier variant. Each round every sampled client trains
on its private data mixed with distillation (weight ``kd_weight``) towards the previous
round's released labels, and votes on that round's public subset; the server answers,
charges privacy and trains the student every round, and sends the released labels back
as one-hot targets (post-processing).

Privacy, enforced: the data-independent RDP bound, ``alpha / sigma^2`` per answered query
and ``alpha / (2 sigma1^2)`` per threshold check, composed over answerings and converted to
(epsilon, ``privacy.delta``). Changing one client's data, or all of it, changes only its
own vote on each query, so the bound holds per client (client-level) and so per record.

Privacy, reported: the data-dependent RDP of the 2018 paper (Theorem 6 with Proposition
7's bound on q, and the threshold check's data-dependent cost; after the authors'
``research/pate_2018/core.py``), from the actual vote counts: every query's check, each
answered query's GNMax answer (the realised answers, as for the bound). It is the round
metric ``epsilon_data_dependent`` and the privacy record's ``epsilon_data_dependent``; it is
never above the bound. It depends on the private votes, so it is not itself DP: the 2018
paper releases it through smooth sensitivity, which fedkd does not do, and the budget
(``privacy.target_epsilon``) applies to the data-independent bound only.

With a handful of clients as teachers the noise must stay small, so epsilons are large
(PATE needs hundreds of teachers). See ``docs/papers/pate.md`` for every deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.payloads import Payload, SoftLabels, Votes
from fedkd.privacy import NoiseSource
from fedkd.privacy.accounting import gnmax_rdp, pate_rdp_data_dependent, rdp_epsilon
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
    make_params,
)

MODES = ("one_shot", "per_round")


@dataclass(frozen=True)
class PATEParams:
    # one_shot: teachers train on private data only and are queried once, in the last
    # round (the papers); per_round: query, charge and distil back every round
    mode: str = "one_shot"
    sigma: float = 2.0  # GNMax noise std on the vote counts
    confident: bool = True  # Confident-GNMax: answer only clear majorities
    threshold: float = 0.6  # share of the voting clients the noisy maximum must reach
    sigma1: float = 1.5  # noise std of the threshold check
    kd_weight: float = 0.3  # per_round: clients' weight of distillation to the released labels

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("sigma", "sigma1"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")


def queries_per_round(config: Config) -> int:
    """Queries of one answering: ``server.public_subset`` (all public samples if 0)."""
    k = config.server.public_subset
    return config.data.public if k == 0 else min(k, config.data.public)


def round_rdp(config: Config, p: PATEParams) -> np.ndarray:
    """Worst case of one answering: every query answered (and checked)."""
    q = queries_per_round(config)
    return gnmax_rdp(q, q if p.confident else 0, p.sigma, p.sigma1 if p.confident else None)


def query_rounds(config: Config, p: PATEParams) -> list[int] | None:
    """The rounds in which the teachers are queried (None: every round)."""
    return [config.rounds] if p.mode == "one_shot" else None


@CLIENT_STRATEGIES.register("pate")
class PATEClient(ClientStrategy):
    """A teacher: trains on its private data, votes with its argmax when asked."""

    Params = PATEParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        if self.params.mode == "one_shot":  # teachers never learn from the student
            return node.train_private()
        kd = targets if isinstance(targets, SoftLabels) and len(targets.idx) else None
        return node.train_private(kd=kd, kd_weight=self.params.kd_weight)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        if len(public_idx) == 0:  # not a query round: nothing to vote on
            return None
        labels = node.public_logits(public_idx).argmax(1).astype(np.int16)
        return Votes(np.asarray(public_idx), labels)


@SERVER_STRATEGIES.register("pate")
class PATEServer(ServerStrategy):
    """The aggregator and the student: (Confident-)GNMax over the teachers' votes."""

    Params = PATEParams
    client_strategy = PATEClient
    accepts = (Votes,)
    own_mechanism = "votes"  # GNMax on the teachers' votes, charged to server.privacy

    @classmethod
    def check_config(cls, config: Config) -> None:
        from fedkd.assignment import sample_clients

        params = make_params(PATEParams, config.strategy.params, "strategy")
        n = config.clients.count
        asked = len(sample_clients(config, config.rounds))
        if params.mode == "one_shot" and asked < n:
            raise ConfigError(
                "clients.fraction",
                f"= {config.clients.fraction:g} asks {asked} of {n} clients, but one-shot PATE "
                f"(strategy.mode = 'one_shot') needs every teacher's vote in its one query "
                "round; set clients.fraction = 1, or strategy.mode = 'per_round'",
            )
        target = config.privacy.target_epsilon
        if target > 0:
            eps = rdp_epsilon(round_rdp(config, params), config.privacy.delta)
            if eps > target:
                raise ConfigError(
                    "privacy.target_epsilon",
                    f"cannot be met: one PATE answering of {queries_per_round(config)} queries "
                    f"may spend epsilon = {eps:.3g}; raise strategy.sigma or lower "
                    "server.public_subset",
                )

    def setup(self, server: ServerNode) -> None:
        assert server.privacy is not None
        cfg = server.config
        server.privacy.expect_rdp_per_round(
            round_rdp(cfg, self.params), query_rounds(cfg, self.params)
        )
        self.noise = NoiseSource(cfg.seed, cfg.privacy.secure_noise)

    def public_query(self, server: ServerNode, public_idx: np.ndarray) -> np.ndarray:
        """one_shot: the round's public subset in the last round, nothing before it."""
        rounds = query_rounds(server.config, self.params)
        return public_idx if rounds is None or server.round in rounds else public_idx[:0]

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        votes = [p for p in payloads.values() if isinstance(p, Votes)]
        idx = votes[0].idx
        counts = np.zeros((len(idx), server.num_classes))
        for v in votes:
            counts[np.arange(len(idx)), v.labels] += 1
        p, rnd = self.params, server.round
        answered = np.ones(len(idx), dtype=bool)
        threshold = p.threshold * len(votes)  # in votes
        if p.confident:
            check = counts.max(1) + self.noise.normal((len(idx),), p.sigma1, "pate-check", rnd)
            answered = check >= threshold
        noisy = counts + self.noise.normal(counts.shape, p.sigma, "pate-gnmax", rnd)
        labels = noisy.argmax(1)[answered]
        assert server.privacy is not None
        checks = len(idx) if p.confident else 0
        sigma1 = p.sigma1 if p.confident else None
        server.privacy.add_rdp(
            gnmax_rdp(int(answered.sum()), checks, p.sigma, sigma1),
            data_dependent=pate_rdp_data_dependent(
                counts, answered, p.sigma, sigma1, threshold if p.confident else None
            ),
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

    def evaluate(self, server: ServerNode) -> Metrics:
        """The student's test metrics, and ``epsilon_data_dependent`` (reported, not DP)."""
        out = super().evaluate(server)
        assert server.privacy is not None
        dep = server.privacy.epsilon_data_dependent()
        out["epsilon_data_dependent"] = 0.0 if dep is None else dep
        return out

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        """per_round: the released labels go back to the clients; one_shot: nothing."""
        return aggregate if self.params.mode == "per_round" else None
