"""FedGKT (strategies/fedgkt.py): payload validation and the wire round trip, the width
check, the client's row-aligned loss by hand, the server's training step, per-client
targets aligned with each client's own samples, and a short in-process federation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkd.config import ConfigError, Spec, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.kd import Batch
from fedkd.kd.step import StepLoss
from fedkd.models import build_model
from fedkd.payloads import PayloadError
from fedkd.training import make_optimizer, train_supervised
from fedkd.wire import payload_to_record, record_to_payload
from strategies.fedgkt import (
    STATE_KEY,
    FedGKTParams,
    FedGKTServer,
    GKTFeatures,
    GKTLogits,
    GKTStep,
    server_logits,
    train_server,
)

STRATEGY = "strategy=strategies.fedgkt:FedGKTServer"
EQUAL_WIDTHS = 'clients.models=[{ name = "mlp", hidden = 100 }, { name = "cnn1d", channels = 20 }]'
C = 3


def _features(n: int = 5, d: int = 4, seed: int = 0) -> GKTFeatures:
    rng = np.random.default_rng(seed)
    return GKTFeatures(
        rng.normal(size=(n, d)).astype(np.float32),
        rng.normal(size=(n, C)).astype(np.float32),
        (np.arange(n) % C).astype(np.int64),
    )


def test_payloads_survive_the_wire_and_count_their_bytes():
    p = _features()
    back = record_to_payload(p.kind, payload_to_record(p))
    assert isinstance(back, GKTFeatures)
    for name in ("features", "logits", "labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(p, name))
    assert p.nbytes == 5 * 4 * 4 + 5 * C * 4 + 5 * 8
    t = GKTLogits(p.logits)
    back_t = record_to_payload(t.kind, payload_to_record(t))
    np.testing.assert_array_equal(back_t.logits, t.logits)
    back.validate(num_classes=C)
    back_t.validate(num_classes=C)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"features": np.zeros(5, np.float32)}, "expected \\(n, D\\)"),
        ({"logits": np.zeros((5, C + 1), np.float32)}, "logits have shape"),
        ({"labels": np.zeros(4, np.int64)}, "labels must be 5 integers"),
        ({"labels": np.full(5, C, np.int64)}, "lie in 0..2"),
        ({"features": np.full((5, 4), np.nan, np.float32)}, "non-finite"),
        ({"logits": np.full((5, C), np.inf, np.float32)}, "non-finite"),
    ],
)
def test_malformed_features_are_rejected(change, why):
    p = _features()
    bad = GKTFeatures(**{**p.arrays(), **change})
    with pytest.raises(PayloadError, match=why):
        bad.validate(num_classes=C)


def test_malformed_server_logits_are_rejected():
    with pytest.raises(PayloadError, match="expected \\(n, 3\\)"):
        GKTLogits(np.zeros((4, 2), np.float32)).validate(num_classes=C)
    with pytest.raises(PayloadError, match="non-finite"):
        GKTLogits(np.full((4, C), np.nan, np.float32)).validate(num_classes=C)


def test_unequal_feature_widths_are_refused_before_the_run(small_config):
    cfg = load_config(small_config, [STRATEGY])  # mlp 100, cnn1d 125
    with pytest.raises(ConfigError) as err:
        FedGKTServer.check_config(cfg)
    assert err.value.args[0].startswith("clients.models")
    assert "mlp: 100 (clients 0, 2)" in str(err.value)
    assert "cnn1d: 125 (clients 1, 3)" in str(err.value)
    FedGKTServer.check_config(load_config(cfg, [EQUAL_WIDTHS]))
    with pytest.raises(ConfigError, match="no feature 'stage1'"):  # the mlp has no stages
        FedGKTServer.check_config(load_config(cfg, [EQUAL_WIDTHS, "strategy.feature=stage1"]))


@pytest.mark.parametrize(
    "override", ["privacy.mechanism=dpsgd", "privacy.mechanism=client_gaussian"]
)
def test_privacy_mechanisms_are_refused(small_config, override):
    cfg = load_config(small_config, [STRATEGY, EQUAL_WIDTHS, override])
    with pytest.raises(ConfigError) as err:
        FedGKTServer.check_config(cfg)
    assert err.value.args[0].startswith("privacy.mechanism")
    assert "in the clear" in str(err.value)


def test_the_server_rejects_features_of_another_width_or_row_count():
    server = SimpleNamespace(state={STATE_KEY: {"dim": 4}}, num_examples={0: 5})
    FedGKTServer().check_payload(server, 0, _features(5, 4))
    with pytest.raises(PayloadError, match="width 6, expected 4"):
        FedGKTServer().check_payload(server, 0, _features(5, 6))
    with pytest.raises(PayloadError, match="3 rows, the client has 5"):
        FedGKTServer().check_payload(server, 0, _features(3, 4))


def test_client_step_is_ce_plus_weighted_kd_by_hand_looked_up_by_row():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1, 1, 0])
    targets = torch.randn(5, C, generator=g)
    rows = torch.tensor([3, 0, 4])  # the batch: private rows 3, 0 and 4, in that order
    logits = torch.randn(3, C, generator=g, requires_grad=True)
    step = GKTStep(targets, kd_weight=0.7, temperature=2.0)
    batch = Batch({"logits": logits}, labels=labels[rows], rows=rows)
    loss = step(batch, None)
    t = 2.0
    ce = F.cross_entropy(logits, torch.tensor([1, 2, 0]))
    p_t = torch.softmax(targets[rows] / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / t, 1))).sum(1).mean() * t * t
    torch.testing.assert_close(loss, ce + 0.7 * kl)
    assert step.terms == pytest.approx({"ce": ce.item(), "kd": kl.item()})
    no_targets = GKTStep(None, 0.7, 2.0)
    torch.testing.assert_close(no_targets(batch, None), ce)
    assert "kd" not in no_targets.terms


class _RowCheck(StepLoss):
    """Asserts that the rows the loop hands over (``main.rows``) index the batch's inputs
    and its labels."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x, self.y, self.seen = model, x, (torch.arange(23) * 7) % C, []

    def forward(self, main: Batch, paired: Batch | None) -> torch.Tensor:
        with torch.no_grad():
            expected = self.model(self.x[main.rows])
        torch.testing.assert_close(main.student["logits"], expected)
        assert torch.equal(main.labels, self.y[main.rows])
        self.seen.append(main.rows.clone())
        return main.student["logits"].pow(2).mean()


def test_the_loop_hands_the_step_the_row_indices_of_its_batch():
    """Each step's ``main.rows`` are its rows of x (and of y)."""
    x = torch.randn(23, 4, generator=torch.Generator().manual_seed(1))
    model = build_model(Spec("logreg"), (4,), C, seed=0)
    step = _RowCheck(model, x)
    train_supervised(
        model, make_optimizer("adam", model, 0.01), x, step.y, epochs=2,
        batch_size=8, generator=torch.Generator().manual_seed(2), step=step,
    )  # fmt: skip
    assert len(step.seen) == 6
    assert sorted(torch.cat(step.seen[:3]).tolist()) == list(range(23))  # each row once


def test_server_training_lowers_its_loss_and_logits_keep_row_order():
    torch.manual_seed(0)
    data = {0: _features(40, 4, seed=1), 1: _features(30, 4, seed=2)}
    model = build_model(Spec("mlp", {"hidden": 16, "layers": 2}), (4,), C, seed=0)
    opt = make_optimizer("adam", model, 0.01)
    kw = {"batch_size": 8, "kd_weight": 1.0, "temperature": 3.0, "device": torch.device("cpu")}
    first = train_server(model, opt, data, epochs=1, generator=torch.Generator(), **kw)
    last = train_server(model, opt, data, epochs=8, generator=torch.Generator(), **kw)
    assert set(first) == {"loss", "ce", "kd", "train_accuracy"}
    assert last["loss"] < first["loss"]
    z = server_logits(model, data[1].features, torch.device("cpu"))
    with torch.no_grad():
        expected = model(torch.as_tensor(data[1].features[[7, 2]]))
    np.testing.assert_allclose(z[[7, 2]], expected.numpy(), rtol=1e-5, atol=1e-6)


class _Recording(InlineTransport):
    def train(self, rnd, requests, public_idx):
        self.requests = getattr(self, "requests", {})
        self.requests[rnd] = dict(requests)
        return super().train(rnd, requests, public_idx)


def test_a_short_federation_sends_each_client_the_server_logits_on_its_own_samples(
    small_config,
):
    cfg = load_config(
        small_config,
        [STRATEGY, EQUAL_WIDTHS, "clients.local_epochs=1", "server.epochs=1",
         "privacy.audit=false"],
    )  # fmt: skip
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    transport = _Recording(cfg, str(path))
    sent: dict[int, dict[int, np.ndarray]] = {}

    def after(record) -> None:  # the server's logits right after the round's training
        st = federation.server.state[STATE_KEY]
        for cid, feats in st["features"].items():
            np.testing.assert_array_equal(feats.labels, data.private_y[data.parts[cid]])
            z = server_logits(st["model"], feats.features, federation.server.device)
            np.testing.assert_allclose(st["logits"][cid], z, rtol=1e-5, atol=1e-6)
        sent[record.round] = {c: z.copy() for c, z in st["logits"].items()}

    records = federation.run(transport, on_round=after)
    assert [r.round for r in records] == [1, 2, 3] and not any(r.failed for r in records)
    sizes = [len(p) for p in data.parts]
    assert records[0].bytes_down == 0 and all(v is None for v in transport.requests[1].values())
    for rec in records:
        assert not rec.failures and len(rec.clients) == 4
        assert rec.bytes_up == sum(n * (100 * 4 + 10 * 4 + 8) for n in sizes)
        assert set(rec.server) == {"loss", "ce", "kd", "train_accuracy"}
        if rec.round > 1:
            assert rec.bytes_down == sum(n * 10 * 4 for n in sizes)
            for cid, req in transport.requests[rec.round].items():
                assert isinstance(req, GKTLogits) and len(req.logits) == sizes[cid]
                np.testing.assert_array_equal(req.logits, sent[rec.round - 1][cid])
            for c in rec.clients.values():
                assert np.isfinite(c.metrics["train_kd"]) and 0 <= c.accuracy <= 1


def test_params_are_validated():
    with pytest.raises(ConfigError, match="temperature"):
        FedGKTParams(temperature=0)
    with pytest.raises(ConfigError, match="feature"):
        FedGKTParams(feature="logits")
