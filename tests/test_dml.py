"""Federated deep mutual learning (strategies/dml.py; Zhang et al., CVPR 2018).

Pinned by hand: the leave-one-out mean of the peers' probabilities, the claim that
DML's averaged sum of KLs has the gradients of one ``prob_kl`` towards the peers' mean
probabilities, the payload kinds, round 1 without targets, and a short federation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import strategies.dml  # noqa: F401 - registers "dml" (also imported by the strategies package)
from fedkd.config import ConfigError, Spec, load_config
from fedkd.losses import ProbKL
from fedkd.models import build_model
from fedkd.payloads import Logits, SoftLabels
from fedkd.selection import client_strategy, server_strategy
from fedkd.strategy import CLIENT_STRATEGIES, SERVER_STRATEGIES, ClientNode, ServerNode
from fedkd.training import make_optimizer
from strategies.dml import DMLClient, DMLParams, DMLServer

D, C = 6, 3  # input features, classes
IDX = np.array([4, 9], np.int64)  # the public samples the round asked about
PROBS = {  # three clients' softmax outputs on IDX
    0: np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32),
    1: np.array([[0.1, 0.1, 0.8], [0.5, 0.4, 0.1]], np.float32),
    2: np.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]], np.float32),
}


def config(*overrides: str):
    return load_config(
        None, ["strategy.name=dml", "clients.count=4", "clients.models=['mlp']", *overrides]
    )


def make_server(cfg) -> ServerNode:
    gen = torch.Generator().manual_seed(0)
    return ServerNode(
        round=1,
        teacher=None,
        optimizer=None,
        public_x=torch.randn(12, D, generator=gen),
        test_x=torch.randn(12, D, generator=gen),
        test_y=torch.arange(12) % C,
        num_classes=C,
        config=cfg,
        generator=gen,
        public_idx=IDX,
    )


def make_client(cfg, cid: int = 0) -> ClientNode:
    gen = torch.Generator().manual_seed(100 + cid)
    model = build_model(Spec("mlp"), (D,), C, seed=7)
    return ClientNode(
        cid=cid,
        round=1,
        model=model,
        optimizer=make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr),
        x=torch.randn(40, D, generator=gen),
        y=torch.arange(40) % C,
        public_x=torch.randn(12, D, generator=gen),
        public_y=torch.arange(12) % C,
        test_x=torch.randn(12, D, generator=gen),
        test_y=torch.arange(12) % C,
        num_classes=C,
        settings=cfg.clients,
        generator=torch.Generator().manual_seed(cid),
        device=torch.device("cpu"),
    )


def aggregated(*cids: int) -> tuple[DMLServer, ServerNode, SoftLabels]:
    """A server after a round in which clients ``cids`` replied."""
    strategy, server = DMLServer(), make_server(config())
    agg = strategy.aggregate(server, {c: SoftLabels(IDX.copy(), PROBS[c]) for c in cids})
    assert isinstance(agg, SoftLabels)
    return strategy, server, agg


# --- the server: leave-one-out mean of the peers' probabilities ----------------------------


def test_each_client_gets_the_mean_of_the_other_clients_probabilities():
    strategy, server, agg = aggregated(0, 1, 2)
    np.testing.assert_allclose(agg.probs, (PROBS[0] + PROBS[1] + PROBS[2]) / 3, atol=1e-6)
    target = strategy.client_targets(server, 1, agg)
    assert isinstance(target, SoftLabels)
    np.testing.assert_array_equal(target.idx, IDX)
    # client 1's target excludes its own row: (p0 + p2) / 2, written out
    np.testing.assert_allclose(target.probs, [[0.4, 0.4, 0.2], [0.1, 0.6, 0.3]], atol=1e-6)
    target.validate(num_classes=C, public_idx=IDX)
    for cid, others in ((0, (1, 2)), (2, (0, 1))):
        got = strategy.client_targets(server, cid, agg)
        assert isinstance(got, SoftLabels)
        np.testing.assert_allclose(got.probs, sum(PROBS[o] for o in others) / 2, atol=1e-6)


def test_the_peers_are_the_clients_that_replied():
    strategy, server, agg = aggregated(0, 2)  # client 1 was not sampled (or dropped out)
    alone = strategy.client_targets(server, 0, agg)
    assert isinstance(alone, SoftLabels)
    np.testing.assert_allclose(alone.probs, PROBS[2], atol=1e-6)  # its one peer
    absent = strategy.client_targets(server, 1, agg)  # learns from everyone who replied
    assert isinstance(absent, SoftLabels)
    np.testing.assert_allclose(absent.probs, (PROBS[0] + PROBS[2]) / 2, atol=1e-6)
    strategy, server, agg = aggregated(2)  # a lone replier has no peer: CE only
    assert strategy.client_targets(server, 2, agg) is None
    other = strategy.client_targets(server, 0, agg)
    assert isinstance(other, SoftLabels)
    np.testing.assert_allclose(other.probs, PROBS[2], atol=1e-6)


# --- the maths: DML's sum of KLs vs prob_kl towards the peers' mean ----------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sum_of_peer_kls_has_the_gradients_of_prob_kl_towards_the_mean_probabilities(
    temperature: float,
):
    """sum_l KL(p_l || p_k) = sum_l [H(p_l, p_k) - H(p_l)], H linear in its first
    argument: equal, up to a constant in the student, to (K-1) KL(mean_l p_l || p_k)."""
    gen = torch.Generator().manual_seed(3)
    k, t = 4, temperature  # the student and K - 1 = 3 peers
    peers = [torch.softmax(2 * torch.randn(5, 7, generator=gen), -1) for _ in range(k - 1)]
    student = torch.randn(5, 7, generator=gen)

    s1 = student.clone().requires_grad_()
    log_p = F.log_softmax(s1 / t, -1)
    dml = t * t * sum(F.kl_div(log_p, p, reduction="batchmean") for p in peers)
    (g_dml,) = torch.autograd.grad(dml, s1)

    s2 = student.clone().requires_grad_()
    mean = torch.stack(peers).mean(0)
    ours = (k - 1) * ProbKL(t)(s2, mean)
    (g_ours,) = torch.autograd.grad(ours, s2)
    torch.testing.assert_close(g_ours, g_dml, atol=1e-6, rtol=1e-5)

    # the values differ by a constant: the entropies' Jensen gap, >= 0 (so the two are
    # not the same number, only the same objective)
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum(-1).mean()

    gap = t * t * ((k - 1) * entropy(mean) - sum(entropy(p) for p in peers))
    torch.testing.assert_close(dml - ours, gap, atol=1e-5, rtol=1e-5)
    assert gap > 0

    # the mean of the peers' *logits* is another target, with other gradients
    logits = [p.log() for p in peers]
    s3 = student.clone().requires_grad_()
    mean_logits = torch.stack(logits).mean(0)
    wrong = (k - 1) * ProbKL(t)(s3, torch.softmax(mean_logits, -1))
    (g_wrong,) = torch.autograd.grad(wrong, s3)
    assert (g_wrong - g_dml).abs().max() > 1e-3


# --- payloads, registration, round 1 -------------------------------------------------------


def test_registered_as_dml_exchanging_soft_labels_without_a_teacher():
    assert SERVER_STRATEGIES.get("dml") is DMLServer
    assert CLIENT_STRATEGIES.get("dml") is DMLClient
    cfg = config("strategy.kd_weight=0.3")
    strategy = server_strategy(cfg)
    assert isinstance(strategy, DMLServer) and strategy.params == DMLParams(kd_weight=0.3)
    assert isinstance(client_strategy(cfg, 2), DMLClient)
    assert DMLServer.uses_teacher is False and DMLServer.accepts == (SoftLabels,)
    assert not issubclass(Logits, DMLServer.accepts)  # logits are refused on arrival


def test_the_client_sends_its_softmax_probabilities():
    node = make_client(config())
    for t in (1.0, 2.0):
        payload = DMLClient(DMLParams(temperature=t)).predict(node, IDX)
        assert isinstance(payload, SoftLabels)
        payload.validate(num_classes=C, public_idx=IDX)
        node.model.eval()
        with torch.no_grad():
            expected = torch.softmax(node.model(node.public_x[IDX]).double() / t, -1)
        np.testing.assert_allclose(payload.probs, expected.numpy(), atol=1e-6)


def test_round_one_has_no_targets_and_trains_on_cross_entropy_alone():
    strategy, server = DMLServer(), make_server(config())
    assert strategy.client_targets(server, 0, None) is None
    cfg = config()
    a, b = make_client(cfg), make_client(cfg)
    metrics = DMLClient().train(a, None)
    assert metrics["kd"] == 0.0 and metrics["loss"] == pytest.approx(metrics["ce"])
    b.train_private()  # plain cross-entropy, same seeds
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_with_peer_targets_the_mutual_term_trains():
    cfg = config()
    node = make_client(cfg)
    peers = SoftLabels(IDX.copy(), PROBS[0])
    metrics = DMLClient().train(node, peers)
    assert metrics["kd"] > 0
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce"] + 0.5 * metrics["kd"], rel=1e-5)


def test_params_are_validated_and_central_noise_is_refused():
    with pytest.raises(ConfigError, match="kd_weight"):
        DMLParams(kd_weight=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        DMLParams(temperature=0)
    from fedkd.runner import check_privacy_config

    cfg = config("privacy.mechanism='client_gaussian'", "privacy.mode='central'")
    with pytest.raises(ConfigError) as err:
        check_privacy_config(cfg, server_strategy(cfg))
    assert err.value.field == "privacy.mode"  # one noisy mean cannot leave a client out


# --- a short federation ------------------------------------------------------------------


def test_a_federation_of_mutual_learners_runs_three_rounds(small_config):
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    # the whole [strategy] table: small_config's carries kd's parameters
    cfg = load_config(small_config, ['strategy={name="dml"}', "rounds=3", "privacy.audit=false"])
    data, path = prepare_federated_data(cfg)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert len(records) == 3
    assert all(not r.failures and len(r.clients) == 4 for r in records)
    probs_bytes = 400 * 10 * 4  # float32 probabilities on the whole public set
    first, *later = records
    assert all(c.bytes_down == 0 and c.metrics["train_kd"] == 0 for c in first.clients.values())
    for rec in later:
        for c in rec.clients.values():
            assert c.bytes_up == probs_bytes and c.bytes_down == probs_bytes
            assert c.metrics["train_kd"] > 0 and np.isfinite(c.accuracy)
