"""PATE as in the papers (Papernot et al. 2017, 2018): one-shot querying, the per-round
variant kept as an option, and the 2018 data-dependent RDP analysis reported beside the
data-independent bound."""

from __future__ import annotations

import numpy as np
import pytest

import fedkd
from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, public_indices
from fedkd.inline import InlineTransport
from fedkd.payloads import Votes
from fedkd.privacy.accounting import (
    ORDERS,
    PrivacyLedger,
    gnmax_logq,
    gnmax_rdp,
    gnmax_rdp_data_dependent,
    pate_rdp_data_dependent,
    rdp_epsilon,
    threshold_logpr_answered,
    threshold_rdp_data_dependent,
)
from fedkd.runner import check_config
from strategies.pate import PATEParams, PATEServer, round_rdp
from tests.conftest import SMALL


def _cfg(tmp_path, mode: str, *extra: str):
    return load_config(
        None,
        [
            *SMALL,
            f"output_dir={tmp_path}",
            "baseline=false",
            "privacy.audit=false",
            f'strategy={{name="pate", mode="{mode}"}}',
            *extra,
        ],
    )


class SpyTransport(InlineTransport):
    """The inline transport, remembering the public indices each round sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: dict[int, np.ndarray] = {}

    def train(self, rnd, requests, public_idx):
        self.sent[rnd] = np.array(public_idx)
        return super().train(rnd, requests, public_idx)


def _run(cfg):
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    transport = SpyTransport(cfg, str(path))
    return federation, federation.run(transport), transport


# --- config -------------------------------------------------------------------------------


def test_one_shot_is_the_default_and_mode_is_validated(tmp_path):
    assert PATEParams().mode == "one_shot"
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(tmp_path, "sometimes"))
    assert err.value.field == "strategy.mode"
    assert "one_shot" in str(err.value) and "per_round" in str(err.value)


def test_one_shot_refuses_a_client_fraction_that_leaves_teachers_out(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(tmp_path, "one_shot", "clients.fraction=0.5"))
    assert err.value.field == "clients.fraction"
    assert "every teacher" in str(err.value) and "per_round" in str(err.value)
    check_config(_cfg(tmp_path, "per_round", "clients.fraction=0.5"))  # per round: allowed
    check_config(_cfg(tmp_path, "one_shot"))


def test_the_forecast_is_zero_before_the_query_round_and_one_answering_in_it(tmp_path):
    cfg = _cfg(tmp_path, "one_shot", "rounds=3")
    worst = round_rdp(cfg, PATEParams())
    one = rdp_epsilon(worst, cfg.privacy.delta)
    capped = load_config(cfg, [f"privacy.target_epsilon={one * 0.5}"])
    ledger = PrivacyLedger(capped)
    ledger.expect_rdp_per_round(worst, rounds=[3])
    assert not ledger.forecast(1).any() and not ledger.forecast(2).any()
    np.testing.assert_array_equal(ledger.forecast(3), worst)
    assert ledger.stop_reason(1, [0]) is None and ledger.stop_reason(2, [0]) is None
    assert "round 3" in ledger.stop_reason(3, [0])  # the one answering would exceed it
    assert ledger.epsilons([0], 3)[0] == pytest.approx(one, rel=1e-12)
    assert ledger.epsilons([0])[0] == pytest.approx(one, rel=1e-12)  # any round: worst case


# --- the federation -----------------------------------------------------------------------


def test_one_shot_asks_and_charges_only_in_the_last_round(tmp_path):
    cfg = _cfg(tmp_path, "one_shot", "rounds=3")
    federation, records, transport = _run(cfg)
    assert [r.round for r in records] == [1, 2, 3]
    for r in records[:2]:  # teacher-training rounds: nothing asked, sent or spent
        assert transport.sent[r.round].size == 0
        assert r.bytes_up == 0 and r.bytes_down == 0 and not r.failures
        assert len(r.clients) == cfg.clients.count  # every teacher trained
        assert r.privacy.epsilon == 0.0 and r.privacy.epsilon_data_dependent is None
        assert "answered" not in r.server
    last = records[-1]
    idx = public_indices(cfg, 3)
    np.testing.assert_array_equal(transport.sent[3], idx)  # the fixed, seeded queries
    assert last.bytes_up == cfg.clients.count * len(idx) * 2  # int16 votes, one per query
    assert last.bytes_down == 0  # teachers never receive the released labels
    answered = int(last.server["answered"])
    assert 0 < answered <= len(idx)
    p = PATEParams()
    spent = gnmax_rdp(answered, len(idx), p.sigma, p.sigma1)  # exactly one answering
    np.testing.assert_allclose(federation.server.privacy.rdp, spent, rtol=1e-12)
    assert last.privacy.epsilon == pytest.approx(rdp_epsilon(spent, cfg.privacy.delta), rel=1e-12)
    assert last.privacy.epsilon <= rdp_epsilon(round_rdp(cfg, p), cfg.privacy.delta)
    dep = last.privacy.epsilon_data_dependent
    assert dep is not None and 0 < dep <= last.privacy.epsilon
    assert last.server["epsilon_data_dependent"] == dep
    assert federation.server.teacher_updates == 1  # the student trained once


def test_a_budget_of_one_answering_lets_one_shot_finish_and_stops_per_round(tmp_path):
    cfg = _cfg(tmp_path, "one_shot", "rounds=3")
    one = rdp_epsilon(round_rdp(cfg, PATEParams()), cfg.privacy.delta)
    budget = [f"privacy.target_epsilon={one * 1.001}"]
    check_config(load_config(cfg, budget))
    federation, records, _ = _run(load_config(cfg, budget))
    assert len(records) == 3 and federation.stopped is None
    assert 0 < records[-1].privacy.epsilon <= one * 1.001
    per_round = load_config(cfg, [*budget, "strategy.mode=per_round"])
    federation, records, _ = _run(per_round)
    assert len(records) == 1 and "round 2" in federation.stopped


def test_per_round_asks_charges_and_distils_back_every_round(tmp_path):
    cfg = _cfg(tmp_path, "per_round", "rounds=2")
    federation, records, transport = _run(cfg)
    p = PATEParams(mode="per_round")
    spent = np.zeros(len(ORDERS))
    for r in records:
        idx = public_indices(cfg, r.round)
        np.testing.assert_array_equal(transport.sent[r.round], idx)
        assert r.bytes_up == cfg.clients.count * len(idx) * 2
        spent = spent + gnmax_rdp(int(r.server["answered"]), len(idx), p.sigma, p.sigma1)
        assert r.privacy.epsilon == pytest.approx(rdp_epsilon(spent, cfg.privacy.delta), rel=1e-12)
        assert r.privacy.epsilon_data_dependent <= r.privacy.epsilon
    assert records[0].bytes_down == 0 and records[1].bytes_down > 0  # released labels sent back
    assert records[1].privacy.epsilon > records[0].privacy.epsilon > 0
    assert federation.server.teacher_updates == 2


# --- data-dependent RDP against the authors' code -------------------------------------------

# Reference values computed with the authors' code, research/pate_2018/core.py of
# github.com/tensorflow/privacy (run with numpy/scipy and a stub for absl.app):
#   logq = core.compute_logq_gaussian(np.array(votes, float), sigma)
#   core.rdp_gaussian(logq, sigma, np.array([2., 8., 32., 128., 1024.]))
#   lp = core.compute_logpr_answered(T, sigma1, votes)
#   core.compute_rdp_threshold(lp, sigma1, orders)
# Our functions matched it to a relative 4e-15 over 400 random vote vectors and 1,260
# threshold settings at fedkd's ORDERS (a one-off check, outside the test suite).
REF_ORDERS = np.array([2.0, 8.0, 32.0, 128.0, 1024.0])
GNMAX_REFERENCE = [
    # (votes over 10 classes, sigma, logq, RDP at REF_ORDERS)
    (  # unanimous, 250 teachers
        [250] + [0] * 9,
        40.0,
        -10.019228294289038,
        [1.527357262762397e-05, 2.058913329943616e-05, 2.034549876235079e-04, 0.08, 0.64],
    ),
    (  # the MNIST setting of the 2018 paper (sigma2 = 40), a strong majority
        [230, 10, 5, 5] + [0] * 6,
        40.0,
        -8.241357632571564,
        [8.134985549703837e-05, 1.060805969332258e-04, 7.647949504497791e-04, 0.08, 0.64],
    ),
    (  # a clear but split vote: data-dependent at middle orders only
        [200, 50] + [0] * 8,
        40.0,
        -5.1791523112595685,
        [0.00125, 0.001654884189231987, 0.006175484664843857, 0.08, 0.64],
    ),
    (  # a split vote: the data-independent alpha / sigma^2 everywhere
        [120, 100, 30] + [0] * 7,
        40.0,
        -0.6231087931992196,
        [0.00125, 0.005, 0.02, 0.08, 0.64],
    ),
]
THRESHOLD_REFERENCE = [
    # (votes, threshold T, sigma1, log Pr[answered], RDP at REF_ORDERS)
    (  # the MNIST setting: T = 200, sigma1 = 150: the data-independent alpha / (2 sigma1^2)
        [230, 10, 5, 5] + [0] * 6,
        200.0,
        150.0,
        -0.5460043537227742,
        list(REF_ORDERS / (2 * 150.0**2)),
    ),
    (  # far above the threshold with little noise: data-dependent
        [250, 0],
        200.0,
        20.0,
        -0.00622902548586,
        [0.0021449911234190404, 0.002883362796425878, 0.02122398397408986, 0.16, 1.28],
    ),
]


@pytest.mark.parametrize(("votes", "sigma", "logq", "rdp"), GNMAX_REFERENCE)
def test_gnmax_data_dependent_rdp_matches_the_authors_code(votes, sigma, logq, rdp):
    ours = gnmax_logq(np.array(votes), sigma)
    assert float(ours) == pytest.approx(logq, rel=1e-12)
    np.testing.assert_allclose(gnmax_rdp_data_dependent(ours, sigma, REF_ORDERS), rdp, rtol=1e-9)
    batch = gnmax_logq(np.array([votes, votes]), sigma)  # one row per query
    np.testing.assert_allclose(batch, [logq, logq], rtol=1e-12)
    assert gnmax_rdp_data_dependent(batch, sigma, REF_ORDERS).shape == (2, len(REF_ORDERS))


@pytest.mark.parametrize(("votes", "t", "sigma1", "log_pr", "rdp"), THRESHOLD_REFERENCE)
def test_threshold_data_dependent_rdp_matches_the_authors_code(votes, t, sigma1, log_pr, rdp):
    ours = threshold_logpr_answered(np.array(votes), t, sigma1)
    assert float(ours) == pytest.approx(log_pr, rel=1e-12)
    got = threshold_rdp_data_dependent(ours, sigma1, REF_ORDERS)
    np.testing.assert_allclose(got, rdp, rtol=1e-9)


def test_a_certain_outcome_costs_nothing():
    assert not gnmax_rdp_data_dependent(-np.inf, 2.0).any()
    assert not threshold_rdp_data_dependent(0.0, 2.0).any()  # always answered
    assert not threshold_rdp_data_dependent(-np.inf, 2.0).any()  # never answered


def test_data_dependent_never_exceeds_the_data_independent_bound():
    rng = np.random.default_rng(0)
    for _ in range(30):
        teachers, classes = int(rng.integers(3, 300)), int(rng.integers(2, 11))
        sigma, sigma1 = rng.uniform(0.3, 60, size=2)
        p = rng.dirichlet(np.full(classes, rng.choice([0.05, 0.5, 5.0])), size=40)
        counts = np.stack([rng.multinomial(teachers, row) for row in p])
        answered = rng.random(40) < 0.5
        t = rng.uniform(0.3, 1.0) * teachers
        dep = pate_rdp_data_dependent(counts, answered, sigma, sigma1, t)
        bound = gnmax_rdp(int(answered.sum()), 40, sigma, sigma1)
        assert np.all(dep <= bound * (1 + 1e-12))


def test_strong_agreement_costs_far_less_than_the_bound(tmp_path):
    """The 2018 MNIST setting: 250 teachers, T = 200, sigma1 = 150, sigma2 = 40, 640
    queries; teachers in strong agreement, through the strategy and the ledger."""
    cfg = _cfg(tmp_path, "one_shot", "rounds=1")
    data, _ = prepare_federated_data(cfg)
    server = Federation(cfg, data).server
    server.round = 1
    strategy = PATEServer(PATEParams(sigma=40.0, sigma1=150.0, threshold=0.8))
    strategy.setup(server)
    rng = np.random.default_rng(1)
    idx = np.arange(640)
    truth = rng.integers(0, 10, size=640)
    votes = {}
    for c in range(250):  # each teacher right on 97% of the queries
        wrong = rng.random(640) < 0.03
        labels = np.where(wrong, rng.integers(0, 10, size=640), truth)
        votes[c] = Votes(idx, labels.astype(np.int16))
    released = strategy.aggregate(server, votes)
    np.testing.assert_array_equal(released.probs.argmax(1), truth[released.idx])
    record = server.privacy.record()
    assert record.epsilon_data_dependent < 0.5 * record.epsilon
    assert record.epsilon == pytest.approx(
        rdp_epsilon(gnmax_rdp(len(released.idx), 640, 40.0, 150.0), 1e-5), rel=1e-12
    )
    metrics = strategy.evaluate(server)
    assert metrics["epsilon_data_dependent"] == record.epsilon_data_dependent


def test_the_ledger_never_reports_less_than_a_charge_without_a_data_dependent_curve():
    cfg = load_config(None, [*SMALL])
    ledger = PrivacyLedger(cfg)
    bound = gnmax_rdp(10, 10, 2.0, 2.0)
    ledger.add_rdp(bound)  # no data-dependent curve: nothing to report yet
    assert ledger.epsilon_data_dependent() is None
    ledger.add_rdp(bound, data_dependent=bound * 2)  # capped at the bound, order by order
    np.testing.assert_allclose(ledger.rdp_data_dependent, 2 * bound)
    ledger.add_rdp(bound, data_dependent=np.zeros(len(ORDERS)))
    np.testing.assert_allclose(ledger.rdp_data_dependent, 2 * bound)
    assert ledger.epsilon_data_dependent() < rdp_epsilon(ledger.rdp, cfg.privacy.delta)


# --- a real Flower + Ray run ----------------------------------------------------------------


@pytest.mark.simulation
def test_one_shot_under_flower_reports_both_epsilons(tmp_path):
    from fedkd.results.records import read_rounds, read_summary
    from fedkd.results.report import summary_table

    result = fedkd.run(_cfg(tmp_path, "one_shot", "rounds=2"), quiet=True)
    assert result.summary.status == "completed"
    first, last = result.rounds
    assert first.bytes_up == 0 and first.privacy.epsilon == 0.0
    assert last.bytes_up > 0 and last.server["answered"] > 0
    priv = result.summary.privacy
    assert 0 < priv.epsilon_data_dependent <= priv.epsilon
    assert priv.epsilon_data_dependent == last.server["epsilon_data_dependent"]
    assert read_summary(result.directory).privacy == priv  # summary.json round trip
    assert read_rounds(result.directory / "metrics.jsonl")[-1].privacy == last.privacy
    assert "data-dependent RDP" in summary_table(result.summary)
