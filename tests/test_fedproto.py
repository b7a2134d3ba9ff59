"""FedProto (strategies/fedproto.py): prototype aggregation, the client's step loss, the
last-epoch prototypes, payload and config checks, nearest-prototype evaluation, and a
short in-process federation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import strategies.fedproto  # noqa: F401 - registers "fedproto" (until strategies/ imports it)
from fedkd.config import ConfigError, Spec, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.kd import Batch
from fedkd.models import build_model
from fedkd.payloads import PayloadError, Prototypes
from fedkd.selection import server_strategy
from fedkd.training import make_optimizer, train_steps
from strategies.fedproto import (
    FedProtoClient,
    FedProtoParams,
    FedProtoServer,
    LastEpochMeans,
    ProtoStep,
    aggregate_prototypes,
    known_input_shape,
    nearest_prototype,
)

EQUAL_WIDTHS = 'clients.models=[{ name = "mlp", hidden = 100 }, { name = "cnn1d", channels = 20 }]'


def _protos(means, counts) -> Prototypes:
    return Prototypes(np.asarray(means, np.float32), np.asarray(counts, np.float32))


def test_server_averages_each_class_over_its_holders_weighted_by_sample_count():
    a = _protos([[1, 0], [2, 2], [0, 0]], [3, 1, 0])
    b = _protos([[3, 0], [9, 9], [5, 5]], [1, 0, 2])
    out = aggregate_prototypes({0: a, 1: b}, weighted=True)
    # class 0: (3 * 1 + 1 * 3) / 4; class 1: only client 0 holds it; class 2: only client 1
    np.testing.assert_allclose(out.means, [[1.5, 0], [2, 2], [5, 5]])
    np.testing.assert_array_equal(out.counts, [2, 1, 1])  # clients per row
    plain = aggregate_prototypes({0: a, 1: b}, weighted=False)  # the authors' code
    np.testing.assert_allclose(plain.means, [[2, 0], [2, 2], [5, 5]])


def test_a_class_no_client_holds_gets_a_zero_row_and_count():
    out = aggregate_prototypes({0: _protos([[1, 1], [7, 7]], [2, 0])}, weighted=True)
    np.testing.assert_allclose(out.means, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(out.counts, [1, 0])
    out.validate(num_classes=2)


def test_step_loss_is_ce_plus_ld_times_the_mse_to_the_prototypes_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    emb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    protos = torch.tensor([[0.0, 0.0], [3.0, 3.0], [9.0, 9.0]])
    mask = torch.tensor([True, True, False])  # class 2 has no global prototype
    step = ProtoStep(0.5, protos, mask)
    loss = step(Batch({"logits": logits, "embedding": emb}, labels=y), None)
    ce = F.cross_entropy(logits, y)
    # (|(1,2)-(0,0)|^2 + |(3,4)-(3,3)|^2 + 0 for the class without a prototype) / (B * D)
    proto = (1 + 4 + 0 + 1) / (3 * 2)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * proto, rel=1e-6)
    assert step.terms == pytest.approx({"ce": float(ce), "proto": proto})
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad[2] == 0)  # no pull without a row


def test_without_prototypes_the_step_is_the_cross_entropy_alone():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    step = ProtoStep(1.0)
    loss = step(Batch({"logits": logits, "embedding": torch.zeros(4, 2)}, labels=y), None)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y)))
    assert set(step.terms) == {"ce"}
    assert "student.embedding" in step.needs and step.wants_features


def test_prototypes_come_from_the_last_local_epoch_of_training():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 6, generator=g), torch.arange(23) % 3
    model = build_model(Spec("mlp", {"hidden": 8}), (6,), 3, seed=0)
    means = LastEpochMeans(3, softmax=False, key="embedding", per_epoch=len(y))
    protos = torch.randn(3, 8, generator=g)
    train_steps(
        model, make_optimizer("adam", model, 0.01), x, y, step=ProtoStep(1.0, protos),
        epochs=3, batch_size=5, generator=g, class_means=means,
    )  # fmt: skip
    m, counts = means.means()
    assert m.shape == (3, 8)
    np.testing.assert_array_equal(counts, np.bincount(y.numpy(), minlength=3))  # one epoch


def test_last_epoch_means_start_afresh_each_epoch():
    means = LastEpochMeans(2, softmax=False, key="embedding", per_epoch=3)
    y = torch.tensor([0, 1, 0])
    means.add(torch.full((3, 1), 5.0), y)  # epoch 1
    means.add(torch.tensor([[1.0], [2.0]]), y[:2])  # epoch 2, in two batches
    means.add(torch.tensor([[3.0]]), y[2:])
    m, counts = means.means()
    np.testing.assert_allclose(m, [[2.0], [2.0]])
    np.testing.assert_array_equal(counts, [2, 1])


@pytest.mark.parametrize(
    ("means", "counts", "why"),
    [
        (np.zeros((2, 4)), np.ones(3), "means have shape"),
        (np.zeros((3, 4)), np.ones(2), "counts have shape"),
        (np.full((3, 4), np.nan), np.ones(3), "non-finite"),
        (np.zeros((3, 4)), -np.ones(3), ">= 0"),
    ],
)
def test_malformed_prototypes_are_rejected(means, counts, why):
    with pytest.raises(PayloadError, match=why):
        _protos(means, counts).validate(num_classes=3)


def test_the_server_rejects_prototypes_of_another_width():
    server = SimpleNamespace(state={"dim": 100})
    FedProtoServer().check_payload(server, 0, _protos(np.zeros((10, 100)), np.ones(10)))
    with pytest.raises(PayloadError, match="width 125, expected 100"):
        FedProtoServer().check_payload(server, 3, _protos(np.zeros((10, 125)), np.ones(10)))


def test_unequal_embedding_widths_are_refused_before_the_run(small_config):
    cfg = load_config(small_config, ["strategy=fedproto"])  # mlp 100, cnn1d 125
    with pytest.raises(ConfigError) as err:
        FedProtoServer.check_config(cfg)
    assert err.value.args[0].startswith("clients.models")
    assert "mlp: 100 (clients 0, 2)" in str(err.value)
    assert "cnn1d: 125 (clients 1, 3)" in str(err.value)
    FedProtoServer.check_config(load_config(cfg, [EQUAL_WIDTHS]))


def test_the_width_is_checked_again_on_the_built_data(small_config):
    """Where the config does not tell the input shape, setup checks on the real inputs."""
    cfg = load_config(small_config, ["strategy=fedproto"])
    server = SimpleNamespace(config=cfg, test_x=torch.zeros(2, 40), num_classes=10, state={})
    with pytest.raises(ConfigError, match="same width"):
        FedProtoServer().setup(server)
    server.config = load_config(cfg, [EQUAL_WIDTHS])
    FedProtoServer().setup(server)
    assert server.state["dim"] == 100


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("privacy.mechanism=dpsgd", "privacy.mechanism"),
        ('strategy.losses=[{ name = "ce" }]', "strategy.losses"),
    ],
)
def test_dpsgd_and_a_configured_loss_list_are_refused(small_config, override, field):
    cfg = load_config(small_config, ["strategy=fedproto", EQUAL_WIDTHS, override])
    with pytest.raises(ConfigError) as err:
        server_strategy(cfg)  # the pre-run checks, own_loss included
    assert err.value.args[0].startswith(field)


def test_nearest_prototype_classification_by_hand():
    model = build_model(Spec("logreg"), (2,), 3, seed=0)  # embedding: the inputs
    x = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [1.0, 8.0]])
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    mask = torch.tensor([True, True, False])  # class 2 has no prototype: never predicted
    model.train()
    assert nearest_prototype(model, x, protos, mask).tolist() == [0, 1, 0, 0]
    assert model.training  # mode restored
    assert nearest_prototype(model, x, protos, torch.ones(3, dtype=torch.bool)).tolist() == [
        0, 1, 2, 2,
    ]  # fmt: skip

    node = SimpleNamespace(
        model=model, test_x=x, test_y=torch.tensor([0, 1, 2, 2]), device=torch.device("cpu"),
        state={},
    )  # fmt: skip
    client = FedProtoClient(FedProtoParams())
    assert client.evaluate(node) == {}  # no global prototypes received yet
    node.state["fedproto_global"] = {"means": protos.numpy(), "counts": np.array([2.0, 1, 0])}
    assert client.evaluate(node) == {"proto_accuracy": pytest.approx(0.5)}


def test_a_short_federation_trains_exchanges_and_evaluates_prototypes(small_config):
    cfg = load_config(
        small_config,
        ["strategy=fedproto", EQUAL_WIDTHS, "clients.local_epochs=2", "privacy.audit=false"],
    )
    data, path = prepare_federated_data(cfg)
    assert known_input_shape(cfg) == data.input_shape
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert [r.round for r in records] == [1, 2, 3] and not any(r.failed for r in records)
    per_client = 10 * 100 * 4 + 10 * 4  # prototypes [10, 100] + counts, float32
    for rec in records:
        assert len(rec.clients) == 4 and not rec.failures
        assert rec.server is None or "accuracy" not in rec.server  # no server model
        assert rec.bytes_up == 4 * per_client
        for c in rec.clients.values():
            assert 0 <= c.accuracy <= 1  # the classifier head, as usual
            if rec.round == 1:  # no global prototypes yet: CE only, nothing to evaluate
                assert "train_proto" not in c.metrics
                assert "eval_proto_accuracy" not in c.metrics
            else:
                assert np.isfinite(c.metrics["train_proto"])
                assert 0 <= c.metrics["eval_proto_accuracy"] <= 1
    assert records[-1].bytes_down == 4 * per_client  # the same prototypes to every client
