"""Privacy accounting across rounds, and the budget that stops a run.

Subsampled Gaussian mechanisms (client-level Gaussian, DP-SGD) are accounted by
Opacus' accountants (``rdp``: Mironov 2017 / Mironov et al. 2019; ``prv``: Gopi
et al. 2021) from a history of ``(noise_multiplier, sample_rate, steps)``. PATE's
GNMax uses its data-independent RDP bound (Papernot et al. 2018): ``alpha / sigma^2``
per answered query, ``alpha / (2 sigma_1^2)`` per confidence check, converted to
(epsilon, delta) by Opacus' RDP analysis. That bound is what the budget enforces.

Beside it, PATE's data-dependent RDP (Papernot et al. 2018, Theorem 6 with the
union bound on q of Proposition 7, and the same analysis for the threshold check)
is computed from the actual vote counts (:func:`gnmax_logq`,
:func:`gnmax_rdp_data_dependent`, :func:`threshold_rdp_data_dependent`,
:func:`pate_rdp_data_dependent`), after the authors' ``research/pate_2018/core.py``
in ``github.com/tensorflow/privacy``. It depends on the private votes, so the value is
not itself differentially private: the paper releases it through smooth sensitivity,
which fedkd does not do. It is reported, never enforced.

Client-level mechanisms are charged per participation, with no amplification by
client sampling: the sample is drawn from the run seed and shows in the records,
so it is not secret. DP-SGD's amplification comes from Opacus' Poisson batches.

All epsilons assume the noise is unpredictable: with seeded noise (the default,
for reproducible simulations) anyone holding the seed in ``config.toml`` can
regenerate it, so use ``privacy.secure_noise`` for anything beyond simulation.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.results.records import PrivacyRecord

if TYPE_CHECKING:
    from fedkd.privacy.mechanism import Mechanism

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


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """``log(1 - exp(x))`` for ``x <= 0``, elementwise and stable (``-inf`` at 0);
    the reference's ``_log1mexp``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.where(x < -1, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))
    return np.where(x == 0, -np.inf, out)


def gnmax_logq(counts: np.ndarray, sigma: float) -> np.ndarray:
    """Upper bound on ``ln Pr[GNMax's answer != argmax]`` per query (Papernot et al. 2018,
    Proposition 7: a union bound over the other classes, capped at ``ln(1 - 1/classes)``).

    ``counts``: vote counts, one row per query (or one query as a 1-D array); ``sigma``:
    the GNMax noise std. Returns one ``logq`` per row (a 0-d array for one query). As
    ``compute_logq_gaussian`` in ``research/pate_2018/core.py`` (tensorflow/privacy).
    """
    c = np.asarray(counts, dtype=np.float64)
    rows = np.atleast_2d(c)
    q, classes = rows.shape
    top = rows.argmax(axis=1)
    gaps = rows[np.arange(q), top][:, None] - rows
    from scipy.special import logsumexp  # lazy: PATE only (0.7 s off every worker's start)
    from scipy.stats import norm

    logsf = norm.logsf(gaps, scale=math.sqrt(2) * sigma)
    logsf[np.arange(q), top] = -np.inf  # the argmax itself is not an error
    with np.errstate(divide="ignore"):
        cap = math.log(1 - 1 / classes) if classes > 1 else -math.inf
        logq = np.minimum(logsumexp(logsf, axis=1), cap)
    return logq if c.ndim > 1 else logq.reshape(())


def gnmax_rdp_data_dependent(
    logq: np.ndarray | float, sigma: float, orders: list[float] | np.ndarray = ORDERS
) -> np.ndarray:
    """Data-dependent RDP of one GNMax answer with noise ``sigma`` per query, given
    ``logq``, an upper bound on ``ln Pr[answer != argmax]`` (:func:`gnmax_logq`).

    Papernot et al. 2018, Theorem 6, with the two higher orders of Proposition 10; where
    its conditions fail, and at every order where it is larger, the data-independent
    ``alpha / sigma^2`` is kept, so the result never exceeds it. As ``rdp_gaussian`` in
    ``research/pate_2018/core.py`` (tensorflow/privacy), vectorised over queries.
    Returns shape ``(queries, orders)``, or ``(orders,)`` for a scalar ``logq``.
    """
    lq = np.asarray(logq, dtype=np.float64)
    if np.any(lq > 0) or sigma <= 0:
        raise ValueError(f"need logq <= 0 and sigma > 0, got max logq {lq.max()}, {sigma}")
    col = np.atleast_1d(lq)[:, None]
    alpha = np.asarray(orders, dtype=np.float64)[None, :]
    var = sigma**2
    indep = np.broadcast_to(alpha / var, (col.shape[0], alpha.shape[1]))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mu2 = np.sqrt(var * -col)  # Proposition 10's higher orders mu_2 and mu_1
        mu1 = mu2 + 1
        rdp1, rdp2 = mu1 / var, mu2 / var
        log_a2 = (mu2 - 1) * rdp2
        applies = (
            np.isfinite(col)
            & (mu2 > 1)
            & (col <= log_a2 - mu2 * (np.log1p(1 / (mu1 - 1)) + np.log1p(1 / (mu2 - 1))))
            & (-col > rdp2)
        )
        log1q = _log1mexp(col)
        log_a = (alpha - 1) * (log1q - _log1mexp((col + rdp2) * (1 - 1 / mu2)))
        log_b = (alpha - 1) * (rdp1 - col / (mu1 - 1))
        dep = np.logaddexp(log1q + log_a, col + log_b) / (alpha - 1)
    mask = applies & (mu1 > alpha)
    out = np.where(mask, np.minimum(indep, dep), indep)
    out = np.where(np.isneginf(col), 0.0, out)  # a fixed outcome costs nothing
    return out if lq.ndim else out[0]


def threshold_logpr_answered(counts: np.ndarray, threshold: float, sigma1: float) -> np.ndarray:
    """``ln Pr[max_j n_j + N(0, sigma1^2) >= threshold]`` per query: the probability that
    Confident-GNMax answers (``compute_logpr_answered`` in the reference's ``core.py``;
    ``threshold`` in votes)."""
    c = np.asarray(counts, dtype=np.float64)
    top = np.round(np.atleast_2d(c).max(axis=1))
    from scipy.stats import norm  # lazy, as above

    out = norm.logsf(threshold - top, scale=sigma1)
    return out if c.ndim > 1 else out.reshape(())


def threshold_rdp_data_dependent(
    log_pr_answered: np.ndarray | float, sigma1: float, orders: list[float] | np.ndarray = ORDERS
) -> np.ndarray:
    """Data-dependent RDP of Confident-GNMax's threshold check with noise ``sigma1``:
    Theorem 6 with ``q = min(Pr[answered], Pr[not answered])`` and noise ``sqrt(2) sigma1``
    (the check's input has sensitivity 1, GNMax's 2), never above the data-independent
    ``alpha / (2 sigma1^2)``. As ``compute_rdp_threshold`` in the reference's ``core.py``
    (Papernot et al. 2018, tensorflow/privacy ``research/pate_2018``)."""
    lp = np.asarray(log_pr_answered, dtype=np.float64)
    logq = np.minimum(lp, _log1mexp(np.minimum(lp, 0.0)))
    return gnmax_rdp_data_dependent(logq, math.sqrt(2) * sigma1, orders)


def pate_rdp_data_dependent(
    counts: np.ndarray,
    answered: np.ndarray,
    sigma: float,
    sigma1: float | None = None,
    threshold: float | None = None,
    orders: list[float] | np.ndarray = ORDERS,
) -> np.ndarray:
    """Data-dependent RDP of one batch of (Confident-)GNMax queries, composed.

    ``counts``: vote counts (queries x classes); ``answered``: which queries were
    released. Every query pays its threshold check (when ``sigma1`` and ``threshold``,
    in votes, are given), answered queries also their GNMax answer: the realised
    composition, as :func:`gnmax_rdp` for the data-independent bound, which this never
    exceeds at any order. (The reference's ``smooth_sensitivity_table._compute_rdp``
    charges the expected cost ``Pr[answered] * GNMax`` instead.)
    """
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    answered = np.asarray(answered, dtype=bool)
    rdp = np.zeros(len(orders))
    if answered.any():
        per_query = gnmax_rdp_data_dependent(gnmax_logq(counts[answered], sigma), sigma, orders)
        rdp = rdp + per_query.sum(axis=0)
    if sigma1 is not None and threshold is not None and len(counts):
        log_pr = threshold_logpr_answered(counts, threshold, sigma1)
        rdp = rdp + threshold_rdp_data_dependent(log_pr, sigma1, orders).sum(axis=0)
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
    and :meth:`record` for the round's results; what a round spends, and each client's
    epsilon, come from the configured mechanism (:attr:`plugin`,
    :class:`~fedkd.privacy.mechanism.Mechanism`), which keeps its state here
    (``per_client``, ``dp_steps``) or on itself. Strategies with their own mechanism
    (PATE) call :meth:`add_rdp` (optionally with a data-dependent curve, reported beside
    the bound and never enforced) and declare their per-round worst case, and the rounds
    in which they spend, with :meth:`expect_rdp_per_round`.
    """

    def __init__(self, config: Config, sizes: dict[int, int] | None = None) -> None:
        self.config = config
        self.p = config.privacy
        self.sizes = sizes or {}
        self.mechanism = self.p.mechanism  # its name, as configured
        self.per_client: dict[int, History] = {}
        self.rdp = np.zeros(len(ORDERS))
        self.rdp_round: np.ndarray | None = None
        self.rdp_rounds: frozenset[int] | None = None  # rounds rdp_round applies to (None: all)
        # data-dependent RDP (PATE), None until a strategy reports one
        self.rdp_data_dependent: np.ndarray | None = None
        self.dp_steps: dict[int, int] = {}  # DP-SGD steps per client, as reported
        self.dp_last: dict[int, int] = {}  # steps of each client's last round

    # --- what the mechanisms are --------------------------------------------------------

    @property
    def plugin(self) -> Mechanism:
        """The configured mechanism, whose hooks say what a round spends; built on first
        use (and kept, so it is saved with the checkpoints, with any state of its own)."""
        mechanism = self.__dict__.get("_plugin")
        if mechanism is None:
            from fedkd.privacy.mechanism import make_mechanism

            mechanism = self.__dict__["_plugin"] = make_mechanism(self.p)
        return mechanism

    @property
    def active(self) -> bool:
        return self.plugin.active or self.rdp_round is not None

    @property
    def unit(self) -> str:
        if self.rdp_round is not None:
            return "client-level (PATE: one client is one teacher; covers each of its records)"
        return self.plugin.unit if self.plugin.active else "none"

    def expect_rdp_per_round(self, rdp: np.ndarray, rounds: Collection[int] | None = None) -> None:
        """Declare a strategy's own mechanism and its worst-case RDP per round, spent only
        in ``rounds`` (None: every round; e.g. one-shot PATE spends in the last round only).
        The budget check before each round adds it for those rounds, nothing for others."""
        self.rdp_round = np.asarray(rdp, dtype=np.float64)
        self.rdp_rounds = None if rounds is None else frozenset(int(r) for r in rounds)

    def forecast(self, rnd: int | None) -> np.ndarray:
        """The declared worst-case RDP of round ``rnd`` (None: of any round)."""
        if self.rdp_round is None:
            return np.zeros(len(ORDERS))
        rounds = getattr(self, "rdp_rounds", None)  # absent in checkpoints of older runs
        if rnd is not None and rounds is not None and rnd not in rounds:
            return np.zeros(len(ORDERS))
        return self.rdp_round

    def add_rdp(self, rdp: np.ndarray, data_dependent: np.ndarray | None = None) -> None:
        """Charge ``rdp`` (at :data:`ORDERS`), the data-independent bound that is enforced.

        ``data_dependent``: the same release's data-dependent RDP (PATE), accumulated
        apart for reporting (:meth:`epsilon_data_dependent`); it is capped at ``rdp`` order
        by order (both are valid bounds), and a charge without one counts in full there.
        """
        rdp = np.asarray(rdp, dtype=np.float64)
        before = getattr(self, "rdp_data_dependent", None)
        if data_dependent is not None or before is not None:
            base = self.rdp if before is None else before  # earlier charges count in full
            dep = rdp if data_dependent is None else np.asarray(data_dependent, np.float64)
            self.rdp_data_dependent = base + np.minimum(dep, rdp)
        self.rdp = self.rdp + rdp

    def epsilon_data_dependent(self) -> float | None:
        """Epsilon (at ``privacy.delta``) of the data-dependent RDP reported with
        :meth:`add_rdp`, or None if none was. It depends on the private data, so it is not
        itself differentially private (Papernot et al. 2018 release it through smooth
        sensitivity; fedkd does not), and it is never above the enforced bound."""
        dep = getattr(self, "rdp_data_dependent", None)
        return None if dep is None else rdp_epsilon(dep, self.p.delta)

    # --- per-client histories -------------------------------------------------------------

    def _history(self, cid: int, extra_round: bool) -> History:
        return self.plugin.history(self, cid, extra_round)

    def epsilons(
        self, next_cids: list[int] | None = None, rnd: int | None = None
    ) -> dict[int, float]:
        """Epsilon of every client now, or after one more round (round ``rnd``, None: any
        round, i.e. the worst case) with ``next_cids``."""
        extra = set(next_cids or [])
        delta = self.p.delta
        if self.rdp_round is not None:
            rdp = self.rdp + (self.forecast(rnd) if next_cids is not None else 0)
            eps = rdp_epsilon(rdp, delta)
            return {cid: eps for cid in range(self.config.clients.count)}
        return {
            cid: self.plugin.epsilon(self, cid, cid in extra)
            for cid in range(self.config.clients.count)
        }

    # --- the round loop's calls ---------------------------------------------------------

    def check_start(self, first_cids: list[int]) -> None:
        """Refuse a run whose first round alone exceeds ``privacy.target_epsilon``."""
        target = self.p.target_epsilon
        if not self.active or target <= 0:
            return
        eps = max(self.epsilons(first_cids, 1).values())
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
        worst = max(self.epsilons(cids, rnd).values())
        if worst > target:
            return (
                f"privacy budget: round {rnd} would raise epsilon to {worst:.3g} > target "
                f"{target:g} (delta {self.p.delta:g}, {self.unit})"
            )
        return None

    def charge(self, cids: list[int], metrics: dict[int, dict[str, float]]) -> None:
        """Account for a finished round: ``cids`` were sampled; ``metrics`` holds every
        client that replied (including replies whose payload was then rejected)."""
        self.plugin.charge(self, cids, metrics)

    def record(self) -> PrivacyRecord | None:
        """The round record's ``privacy`` entry (None when no mechanism is active)."""
        if not self.active:
            return None
        eps = self.epsilons()
        return PrivacyRecord(
            mechanism="pate" if self.rdp_round is not None else self.mechanism,
            unit=self.unit,
            delta=self.p.delta,
            accountant="rdp"
            if self.rdp_round is not None
            else self.plugin.accountant or self.p.accountant,
            epsilon=max(eps.values()) if eps else 0.0,
            noise="secure" if self.p.secure_noise else "seeded (epsilon assumes a secret seed)",
            clients=dict(eps),
            epsilon_data_dependent=self.epsilon_data_dependent(),
        )
