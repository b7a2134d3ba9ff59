"""Privacy accounting across rounds, and the budget that stops a run.

Subsampled Gaussian mechanisms (client-level Gaussian, DP-SGD) are accounted by
Opacus' accountants (``rdp``: Mironov 2017 / Mironov et al. 2019; ``prv``: Gopi
et al. 2021) from a history of ``(noise_multiplier, sample_rate, steps)``. PATE's
GNMax uses its data-independent RDP bound (Papernot et al. 2018): ``alpha / sigma^2``
per answered query, ``alpha / (2 sigma_1^2)`` per confidence check, converted to
(epsilon, delta) by Opacus' RDP analysis.

Client-level mechanisms are charged per participation, with no amplification by
client sampling: the sample is drawn from the run seed and shows in the records,
so it is not secret. DP-SGD's amplification comes from Opacus' Poisson batches.

All epsilons assume the noise is unpredictable: with seeded noise (the default,
for reproducible simulations) anyone holding the seed in ``config.toml`` can
regenerate it, so use ``privacy.secure_noise`` for anything beyond simulation.
"""

from __future__ import annotations

import math

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.results.records import PrivacyRecord

#: RDP orders: Opacus' defaults, extended to large orders, which are optimal for
#: weak mechanisms (noise / sensitivity above ~20, e.g. PATE's GNMax)
ORDERS: list[float] = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + list(range(64, 256, 16))
    + [256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
)


def merge(history: History) -> History:
    """Merge entries with the same (noise multiplier, sample rate): same epsilon, and one
    RDP curve per distinct mechanism instead of one per round."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(s, q, n) for (s, q), n in merged.items()]


History = list[tuple[float, float, int]]


class PrivacyError(RuntimeError):
    """A privacy setting or use that cannot be honoured (e.g. budget exhausted)."""


def accountant_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``history`` of (noise multiplier, sample rate, steps)."""
    steps = merge([(s, q, n) for s, q, n in history if n > 0])
    if not steps:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = steps
        return float(rdp.get_epsilon(delta, alphas=ORDERS))
    prv = PRVAccountant()
    prv.history = steps
    return float(prv.get_epsilon(delta))


def gnmax_rdp(answered: int, checks: int, sigma: float, sigma1: float | None) -> np.ndarray:
    """Data-independent RDP (at :data:`ORDERS`) of ``answered`` GNMax answers with
    noise ``sigma`` plus ``checks`` confident-GNMax threshold checks with ``sigma1``."""
    alpha = np.asarray(ORDERS, dtype=np.float64)
    rdp = answered * alpha / sigma**2
    if sigma1 is not None and checks:
        rdp = rdp + checks * alpha / (2 * sigma1**2)
    return rdp


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from an RDP curve at :data:`ORDERS` (Opacus' conversion)."""
    if not np.any(rdp > 0):
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def dpsgd_steps_per_round(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, steps) of one round of DP-SGD with Poisson batches (Opacus' loader)."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, epochs * batches


class PrivacyLedger:
    """What each client has spent so far, the projection for the next round, the budget.

    The round loop calls :meth:`stop_reason` before a round, :meth:`charge` after it
    and :meth:`record` for the round's results. Strategies with their own mechanism
    (PATE) call :meth:`add_rdp` and declare their per-round worst case with
    :meth:`expect_rdp_per_round`.
    """

    def __init__(self, config: Config, sizes: dict[int, int] | None = None) -> None:
        self.config = config
        self.p = config.privacy
        self.sizes = sizes or {}
        self.mechanism = self.p.mechanism
        self.per_client: dict[int, History] = {}
        self.rdp = np.zeros(len(ORDERS))
        self.rdp_round: np.ndarray | None = None
        self.dp_steps: dict[int, int] = {}  # DP-SGD steps per client, as reported
        self.dp_last: dict[int, int] = {}  # steps of each client's last round

    # --- what the mechanisms are --------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.mechanism != "none" or self.rdp_round is not None

    @property
    def unit(self) -> str:
        if self.rdp_round is not None:
            return "client-level (PATE: one client is one teacher; covers each of its records)"
        return {
            "client_gaussian": f"client-level ({self.p.mode} Gaussian on shared payloads)",
            "dpsgd": "record-level (DP-SGD on each client's local training)",
        }.get(self.mechanism, "none")

    def expect_rdp_per_round(self, rdp: np.ndarray) -> None:
        """Declare a strategy's own mechanism and its worst-case RDP per round."""
        self.rdp_round = np.asarray(rdp, dtype=np.float64)

    def add_rdp(self, rdp: np.ndarray) -> None:
        self.rdp = self.rdp + np.asarray(rdp, dtype=np.float64)

    # --- per-client histories -------------------------------------------------------------

    def _dpsgd_round(self, cid: int) -> tuple[float, int]:
        c = self.config.clients
        return dpsgd_steps_per_round(self.sizes.get(cid, 1), c.batch_size, c.local_epochs)

    def _history(self, cid: int, extra_round: bool) -> History:
        sigma = self.p.noise_multiplier
        if self.mechanism == "dpsgd":
            q, per_round = self._dpsgd_round(cid)
            per_round = max(per_round, self.dp_last.get(cid, 0))  # e.g. a warm-up round
            steps = self.dp_steps.get(cid, 0) + (per_round if extra_round else 0)
            return [(sigma, q, steps)]
        if self.mechanism == "client_gaussian":  # one Gaussian release per participation
            return [*self.per_client.get(cid, []), *([(sigma, 1.0, 1)] if extra_round else [])]
        return []

    def epsilons(self, next_cids: list[int] | None = None) -> dict[int, float]:
        """Epsilon of every client now, or after one more round with ``next_cids``."""
        extra = set(next_cids or [])
        delta, acc = self.p.delta, self.p.accountant
        if self.rdp_round is not None:
            rdp = self.rdp + (self.rdp_round if next_cids is not None else 0)
            eps = rdp_epsilon(rdp, delta)
            return {cid: eps for cid in range(self.config.clients.count)}
        return {
            cid: accountant_epsilon(self._history(cid, cid in extra), delta, acc)
            for cid in range(self.config.clients.count)
        }

    # --- the round loop's calls ---------------------------------------------------------

    def check_start(self, first_cids: list[int]) -> None:
        """Refuse a run whose first round alone exceeds ``privacy.target_epsilon``."""
        target = self.p.target_epsilon
        if not self.active or target <= 0:
            return
        eps = max(self.epsilons(first_cids).values())
        if eps > target:
            raise ConfigError(
                "privacy.target_epsilon",
                f"cannot be met: one round already spends epsilon = {eps:.3g} at delta = "
                f"{self.p.delta:g} ({self.unit}); raise noise_multiplier, lower the local "
                "epochs or the sample rate, or raise the budget",
            )

    def stop_reason(self, rnd: int, cids: list[int]) -> str | None:
        """Why round ``rnd`` must not run (it would exceed the budget), or None."""
        target = self.p.target_epsilon
        if not self.active or target <= 0:
            return None
        worst = max(self.epsilons(cids).values())
        if worst > target:
            return (
                f"privacy budget: round {rnd} would raise epsilon to {worst:.3g} > target "
                f"{target:g} (delta {self.p.delta:g}, {self.unit})"
            )
        return None

    def charge(self, cids: list[int], metrics: dict[int, dict[str, float]]) -> None:
        """Account for a finished round: ``cids`` were sampled; ``metrics`` holds every
        client that replied (including replies whose payload was then rejected)."""
        if self.mechanism == "client_gaussian":
            # central: every sampled client is in the release (a missing payload counts as
            # a zero vector); local: every client that uploaded released its noisy payload
            charged = cids if self.p.mode == "central" else list(metrics)
            for cid in charged:
                self.per_client[cid] = merge(self._history(cid, True))
        elif self.mechanism == "dpsgd":
            for cid, m in metrics.items():
                if "dp_steps" in m:
                    self.dp_last[cid] = int(m["dp_steps"]) - self.dp_steps.get(cid, 0)
                    self.dp_steps[cid] = int(m["dp_steps"])

    def record(self) -> PrivacyRecord | None:
        """The round record's ``privacy`` entry (None when no mechanism is active)."""
        if not self.active:
            return None
        eps = self.epsilons()
        return PrivacyRecord(
            mechanism="pate" if self.rdp_round is not None else self.mechanism,
            unit=self.unit,
            delta=self.p.delta,
            accountant="rdp" if self.rdp_round is not None else self.p.accountant,
            epsilon=max(eps.values()) if eps else 0.0,
            noise="secure" if self.p.secure_noise else "seeded (epsilon assumes a secret seed)",
            clients=dict(eps),
        )
