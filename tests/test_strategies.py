"""The built-in algorithms' defining computations, pinned against hand-worked examples.

Each group builds ``ServerNode`` / ``ClientNode`` objects directly (as
``fedkd.federation`` and ``fedkd.client`` do) on tiny synthetic data: no dataset
download, no Flower, no Ray. Expected values are written out by hand or computed by
a few independent lines of NumPy, never by calling the code under test twice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.config import ConfigError, Spec, load_config
from fedkd.losses import KD_LOSSES, LogitMAE, ProbKL, SoftKL
from fedkd.models import build_model
from fedkd.payloads import ClassLogits, Logits, PayloadError, QuantizedSoftLabels, SoftLabels
from fedkd.selection import client_strategy, server_strategy
from fedkd.strategy import ClientNode, ServerNode, public_kd_targets
from fedkd.training import make_optimizer
from strategies.cfd import CFDClient, CFDParams, CFDServer
from strategies.cronus import CronusParams, CronusServer, robust_mean
from strategies.dsfl import DSFLParams, DSFLServer, era
from strategies.fd import FDClient, FDParams, FDServer
from strategies.fedavg import FedAvgClient, FedAvgServer
from strategies.feddf import FedDFParams, FedDFServer
from strategies.fedmd import FedMDClient, FedMDParams, FedMDServer
from tests.test_payload_types import quantized

D, C = 8, 3  # input features, classes

BASE = [
    "clients.count=4",
    "clients.models=['mlp']",
    "clients.batch_size=16",
    "clients.local_epochs=1",
    "server.teacher='logreg'",
    "server.batch_size=16",
    "server.epochs=2",
]


# --- helpers -------------------------------------------------------------------------


def config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def blobs(n: int, seed: int, classes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs in D dimensions; class c is centred at 3 * e_c."""
    gen = torch.Generator().manual_seed(seed)
    y = (
        torch.arange(n) % C
        if classes is None
        else torch.as_tensor(classes)[torch.arange(n) % len(classes)]
    )
    x = 3.0 * torch.eye(C, D)[y] + 0.7 * torch.randn(n, D, generator=gen)
    return x, y


def make_client(
    cfg, cid: int, *, spec: str | None = None, n: int = 48, seed: int = 0, classes=None, **extra
):
    """A client with private blobs, public blobs (labelled) and a fresh student; ``extra``
    sets further ClientNode fields (e.g. ``privacy``, ``strategy_name``)."""
    x, y = blobs(n, seed=1000 + cid, classes=classes)
    public_x, public_y = blobs(60, seed=7)
    test_x, test_y = blobs(60, seed=8)
    model = build_model(Spec(spec or cfg.clients.models[0].name), (D,), C, seed=seed)
    return ClientNode(
        cid=cid,
        round=1,
        model=model,
        optimizer=make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr),
        x=x,
        y=y,
        public_x=public_x,
        public_y=public_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=C,
        settings=cfg.clients,
        generator=torch.Generator().manual_seed(cid),
        device=torch.device("cpu"),
        **extra,
    )


def make_server(cfg, *, teacher: bool = False, num_examples=None, public_idx=None):
    public_x, _ = blobs(60, seed=7)  # the clients' public inputs
    test_x, test_y = blobs(60, seed=8)
    model = build_model(cfg.server.teacher, (D,), C, seed=5) if teacher else None
    return ServerNode(
        round=1,
        teacher=model,
        optimizer=make_optimizer(cfg.server.optimizer, model, cfg.server.lr) if teacher else None,
        public_x=public_x,
        test_x=test_x,
        test_y=test_y,
        num_classes=C,
        config=cfg,
        generator=torch.Generator().manual_seed(0),
        num_examples=dict(num_examples or {}),
        public_idx=np.arange(60, dtype=np.int64) if public_idx is None else public_idx,
    )


def forward(model, x: torch.Tensor) -> np.ndarray:
    """Logits in float64, by a plain eval-mode forward pass."""
    model.eval()
    with torch.no_grad():
        return model(x).double().numpy()


def softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def kl(q: np.ndarray, p: np.ndarray) -> float:
    """Mean over rows of KL(q || p), 0 log 0 = 0."""
    return float((q * (np.log(np.where(q > 0, q, 1.0)) - np.log(p))).sum(axis=1).mean())


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}


def trained_client(cfg, cid: int, spec: str, epochs: int = 2):
    node = make_client(cfg, cid, spec=spec, seed=10 + cid)
    node.train_private(epochs=epochs)
    return node


# --- DS-FL: entropy reduction aggregation --------------------------------------------
"""ERA is ``softmax(mean / T)``; ``era = false`` is simple averaging (SA)."""

MEAN_2x3 = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])


def test_era_by_hand():
    # row 0 at T = 0.1: exp(6), exp(3), exp(1) over their sum
    e = np.exp([6.0, 3.0, 1.0])
    np.testing.assert_allclose(era(MEAN_2x3, 0.1)[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(era(MEAN_2x3, 0.1)[0], [0.94649, 0.04712, 0.00638], atol=2e-5)
    e = np.exp(np.array([0.4, 0.35, 0.25]) / 0.1)
    np.testing.assert_allclose(era(MEAN_2x3, 0.1)[1], e / e.sum(), rtol=1e-6)
    # T = 1: softmax of the probabilities themselves
    e = np.exp(MEAN_2x3)
    np.testing.assert_allclose(era(MEAN_2x3, 1.0), e / e.sum(1, keepdims=True), rtol=1e-6)
    assert era(MEAN_2x3, 0.1).dtype == np.float32


def test_era_at_low_temperature_lowers_each_rows_entropy():
    sharpened = era(MEAN_2x3, 0.1).astype(np.float64)
    assert (entropy(sharpened) < entropy(MEAN_2x3)).all()
    assert (sharpened.argmax(1) == MEAN_2x3.argmax(1)).all()
    assert (entropy(era(MEAN_2x3, 10.0)) > entropy(MEAN_2x3)).all()  # T > 1 flattens


def dsfl_payloads() -> dict[int, SoftLabels]:
    idx = np.array([2, 5], np.int64)
    return {
        0: SoftLabels(idx, np.array([[0.8, 0.2, 0.0], [0.4, 0.3, 0.3]], np.float32)),
        3: SoftLabels(idx, np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]], np.float32)),
    }


def test_dsfl_aggregate_without_era_is_the_plain_mean():
    server = make_server(config("strategy.name='dsfl'"), teacher=True)
    agg = DSFLServer(DSFLParams(era=False)).aggregate(server, dsfl_payloads())
    assert isinstance(agg, SoftLabels)
    np.testing.assert_array_equal(agg.idx, [2, 5])
    np.testing.assert_allclose(agg.probs, MEAN_2x3, rtol=1e-6)


def test_dsfl_aggregate_with_era_sharpens_the_mean():
    server = make_server(config("strategy.name='dsfl'"), teacher=True)
    agg = DSFLServer(DSFLParams(era_temperature=0.1)).aggregate(server, dsfl_payloads())
    e = np.exp(MEAN_2x3 / 0.1)
    np.testing.assert_allclose(agg.probs, e / e.sum(1, keepdims=True), rtol=1e-5)
    agg.validate(num_classes=C, public_idx=np.array([2, 5]))


# --- FD: per-class mean logits ---------------------------------------------------------
"""Clients send per-class mean outputs; the server averages each class over the clients
that hold it and sends each client the leave-one-out mean ``(sum - own) / (M - 1)``."""


def test_class_mean_logits_equals_numpy_per_class_means():
    cfg = config("clients.models=['logreg']")
    node = make_client(cfg, 0, spec="logreg")
    labels = [0, 0, 2, 0, 2, 2, 2]  # class 1 absent
    node.x, node.y = blobs(7, seed=3, classes=labels)
    lin = node.model[1]
    logits = node.x.double().numpy() @ lin.weight.double().detach().numpy().T
    logits += lin.bias.double().detach().numpy()
    y = np.array(labels)
    out = node.class_mean_logits()
    assert isinstance(out, ClassLogits)
    np.testing.assert_array_equal(out.counts, [3, 0, 4])
    np.testing.assert_allclose(out.means[0], logits[y == 0].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.means[1], [0, 0, 0])
    np.testing.assert_allclose(out.means[2], logits[y == 2].mean(0), rtol=1e-5, atol=1e-6)
    out.validate(num_classes=C)
    probs = node.class_mean_logits(softmax=True)  # the paper's mean softmax outputs
    np.testing.assert_array_equal(probs.counts, [3, 0, 4])
    np.testing.assert_allclose(probs.means[0], softmax(logits[y == 0]).mean(0), rtol=1e-5)
    np.testing.assert_array_equal(probs.means[1], [0, 0, 0])
    np.testing.assert_allclose(probs.means[2], softmax(logits[y == 2]).mean(0), rtol=1e-5)


# Three clients, three classes; client 2 has no sample of class 1 (its row is junk and
# must be ignored).
FD_PAYLOADS = {
    0: ClassLogits(
        np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3]], np.float32), np.array([2, 3, 1], np.float32)
    ),
    1: ClassLogits(
        np.array([[3, 0, 0], [0, 4, 0], [0, 0, 5]], np.float32), np.array([1, 1, 4], np.float32)
    ),
    2: ClassLogits(
        np.array([[5, 1, 0], [9, 9, 9], [0, 0, 7]], np.float32), np.array([6, 0, 2], np.float32)
    ),
}


def fd_server(**params):
    cfg = config("strategy.name='fd'")
    strategy = FDServer(FDParams(**params))
    server = make_server(cfg, num_examples={0: 6, 1: 6, 2: 8})
    agg = strategy.aggregate(server, dict(FD_PAYLOADS))
    return strategy, server, agg


def test_fd_aggregate_per_class_mean_over_holders():
    _, _, agg = fd_server()
    assert isinstance(agg, ClassLogits)
    # class 0: mean of (1,0,0), (3,0,0), (5,1,0); class 1: of (0,2,0), (0,4,0) only;
    # class 2: of (0,0,3), (0,0,5), (0,0,7)
    np.testing.assert_allclose(agg.means, [[3, 1 / 3, 0], [0, 3, 0], [0, 0, 5]], rtol=1e-6)
    np.testing.assert_array_equal(agg.counts, [3, 2, 3])  # clients per class
    agg.validate(num_classes=C)


def test_fd_client_targets_leave_one_out_by_hand():
    strategy, server, agg = fd_server()
    t0 = strategy.client_targets(server, 0, agg)
    np.testing.assert_allclose(t0.means, [[4, 0.5, 0], [0, 4, 0], [0, 0, 6]], rtol=1e-6)
    np.testing.assert_array_equal(t0.counts, [2, 1, 2])
    t2 = strategy.client_targets(server, 2, agg)  # client 2 does not hold class 1
    np.testing.assert_allclose(t2.means, [[2, 0, 0], [0, 3, 0], [0, 0, 4]], rtol=1e-6)
    np.testing.assert_array_equal(t2.counts, [2, 2, 2])
    # the paper's formula, (sum_j F_j - F_i) / (M_c - 1) per class, for every client
    holds = {c: p.counts > 0 for c, p in FD_PAYLOADS.items()}
    total = sum(p.means * holds[c][:, None] for c, p in FD_PAYLOADS.items())
    m = sum(holds.values()).astype(np.float64)
    for cid, p in FD_PAYLOADS.items():
        own = p.means * holds[cid][:, None]
        t = strategy.client_targets(server, cid, agg)
        np.testing.assert_allclose(t.means, (total - own) / (m - holds[cid])[:, None], rtol=1e-6)


def test_fd_weighted_uses_sample_counts():
    strategy, server, agg = fd_server(weighted=True)
    # class 0: (2*1 + 1*3 + 6*5) / 9 = 35/9, (6*1) / 9; class 1: (3*2 + 1*4) / 4;
    # class 2: (1*3 + 4*5 + 2*7) / 7 = 37/7
    np.testing.assert_allclose(
        agg.means, [[35 / 9, 2 / 3, 0], [0, 2.5, 0], [0, 0, 37 / 7]], rtol=1e-6
    )
    np.testing.assert_array_equal(agg.counts, [9, 4, 7])
    t1 = strategy.client_targets(server, 1, agg)
    # client 1 left out: class 0 (2*1 + 6*5) / 8, 6 / 8; class 1 (0,2,0); class 2 (3 + 14) / 3
    np.testing.assert_allclose(t1.means, [[4, 0.75, 0], [0, 2, 0], [0, 0, 17 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(t1.counts, [8, 3, 3])


def test_fd_class_held_only_by_the_client_itself_gets_count_zero():
    strategy = FDServer(FDParams())
    server = make_server(config("strategy.name='fd'"))
    payloads = {
        0: ClassLogits(np.eye(3, dtype=np.float32), np.array([4, 2, 5], np.float32)),
        1: ClassLogits(2 * np.eye(3, dtype=np.float32), np.array([3, 1, 0], np.float32)),
    }
    agg = strategy.aggregate(server, payloads)
    np.testing.assert_array_equal(agg.counts, [2, 2, 1])
    t0 = strategy.client_targets(server, 0, agg)
    np.testing.assert_array_equal(t0.counts, [1, 1, 0])
    np.testing.assert_array_equal(t0.means, [[2, 0, 0], [0, 2, 0], [0, 0, 0]])
    t0.validate(num_classes=C)
    t1 = strategy.client_targets(server, 1, agg)  # holds no class-2 sample: nothing removed
    np.testing.assert_array_equal(t1.counts, [1, 1, 1])
    np.testing.assert_array_equal(t1.means, np.eye(3))


def test_fd_shared_targets_without_exclusion_or_for_absent_clients():
    strategy, server, agg = fd_server(exclude_own=False)
    assert strategy.client_targets(server, 0, agg) is agg
    strategy, server, agg = fd_server()
    assert strategy.client_targets(server, 3, agg) is agg  # sent nothing last round
    fresh = FDServer(FDParams())
    assert fresh.client_targets(make_server(config()), 0, None) is None  # round 1


# --- CFD: quantized soft labels ------------------------------------------------------
"""Clients upload ``bits``-bit soft labels; the server averages the dequantized,
renormalized labels and sends its model's soft labels at ``down_bits``."""


def test_cfd_client_predict_quantizes_its_softmax_outputs():
    cfg = config("strategy.name='cfd'")
    node = make_client(cfg, 0)
    idx = np.array([0, 3, 4, 10, 11, 20, 30, 41, 50, 59], np.int64)
    payload = CFDClient(CFDParams(bits=2)).predict(node, idx)
    assert isinstance(payload, QuantizedSoftLabels)
    np.testing.assert_array_equal(payload.meta, [2, 10, C])
    np.testing.assert_array_equal(payload.idx, idx)
    payload.validate(num_classes=C, public_idx=idx)
    probs = softmax(forward(node.model, node.public_x[idx]))
    assert np.abs(payload.dequantize() - probs).max() < 1 / 3  # 3 levels at 2 bits
    # 10 rows x 3 classes x 2 bits = 60 bits -> 8 bytes; 3 int32 meta (indices: derived)
    assert payload.nbytes == 8 + 12
    one_bit = CFDClient(CFDParams(bits=1)).predict(node, idx)  # one-hot argmax
    np.testing.assert_array_equal(one_bit.dequantize().argmax(1), probs.argmax(1))
    np.testing.assert_array_equal(one_bit.dequantize().sum(1), 1)
    assert one_bit.nbytes == math.ceil(30 / 8) + 12


def test_cfd_aggregate_is_the_mean_of_dequantized_renormalized_labels():
    server = make_server(config("strategy.name='cfd'"), teacher=True)
    idx = np.array([1, 2], np.int32)
    payloads = {  # 2 bits: codes / 3, then each row divided by its sum
        0: quantized(np.array([[3, 0, 0], [1, 1, 0]]), 2, idx),  # rows (1,0,0), (.5,.5,0)
        1: quantized(np.array([[0, 0, 0], [0, 0, 3]]), 2, idx),  # all-zero row -> uniform
        2: quantized(np.array([[1, 2, 0], [0, 3, 0]]), 2, idx),  # (1/3, 2/3, 0), (0,1,0)
    }
    agg = CFDServer(CFDParams(bits=2)).aggregate(server, payloads)
    assert isinstance(agg, SoftLabels)
    np.testing.assert_array_equal(agg.idx, [1, 2])
    expected = np.array(
        [
            [(1 + 1 / 3 + 1 / 3) / 3, (0 + 1 / 3 + 2 / 3) / 3, (0 + 1 / 3 + 0) / 3],
            [(0.5 + 0 + 0) / 3, (0.5 + 0 + 1) / 3, (0 + 1 + 0) / 3],
        ]
    )
    np.testing.assert_allclose(agg.probs, expected, rtol=1e-6)


@pytest.mark.parametrize("down_bits", [4, 8, 32])
def test_cfd_targets_are_the_server_models_labels_at_down_bits(down_bits):
    strategy = CFDServer(CFDParams(down_bits=down_bits))
    server = make_server(config("strategy.name='cfd'"), teacher=True)
    agg = SoftLabels(np.arange(3), np.full((3, C), 1 / C, np.float32))
    next_idx = np.array([5, 6, 40, 41], np.int64)
    assert strategy.targets(server, None, next_idx) is None
    assert strategy.targets(server, agg, next_idx) is None  # teacher never distilled yet
    server.teacher_updates = 1  # as after a round's distill_teacher
    targets = strategy.targets(server, agg, next_idx)
    probs = softmax(forward(server.teacher, server.public_x[next_idx]))
    if down_bits == 32:  # float32, unquantized
        assert type(targets) is SoftLabels
        np.testing.assert_allclose(targets.probs, probs, rtol=1e-5)
        np.testing.assert_array_equal(targets.idx, next_idx)
        return
    assert isinstance(targets, QuantizedSoftLabels)
    np.testing.assert_array_equal(targets.meta, [down_bits, 4, C])
    targets.validate(num_classes=C, public_idx=next_idx)
    assert np.abs(targets.dequantize() - probs).max() < 1 / (2**down_bits - 1)
    assert targets.nbytes == math.ceil(4 * C * down_bits / 8) + 12


def test_cfd_defaults_are_one_bit_both_ways_as_in_the_authors_experiments():
    assert (CFDParams().bits, CFDParams().down_bits) == (1, 1)
    strategy = CFDServer()
    server = make_server(config("strategy.name='cfd'"), teacher=True)
    server.teacher_updates = 1
    next_idx = np.array([5, 6, 40, 41], np.int64)
    targets = strategy.targets(server, None, next_idx)
    assert isinstance(targets, QuantizedSoftLabels)
    probs = softmax(forward(server.teacher, server.public_x[next_idx]))
    one_hot = np.eye(C)[probs.argmax(1)]
    np.testing.assert_array_equal(targets.dequantize(), one_hot)  # the server's argmax


def test_cfd_aggregate_distills_the_server_model():
    server = make_server(config("strategy.name='cfd'", "server.epochs=20"), teacher=True)
    idx = np.arange(60, dtype=np.int64)
    target = np.eye(C, dtype=np.float32)[(np.arange(60) + 1) % C] * 0.8 + 0.2 / C
    agg = SoftLabels(idx, target)
    before = kl(target, softmax(forward(server.teacher, server.public_x)))
    CFDServer(CFDParams()).distill(server, agg)
    after = kl(target, softmax(forward(server.teacher, server.public_x)))
    assert after < 0.5 * before


# --- Cronus: robust mean ---------------------------------------------------------------
"""A spectral filter drops outlying soft labels (at most ``max_outlier_fraction`` of the
clients per sample) before averaging."""


def cronus_points(honest: int, bad: int, samples: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centre = rng.dirichlet(np.ones(4), size=samples)  # one honest vector per sample
    noise = 0.01 * rng.normal(size=(samples, honest, 4))
    good = np.clip(centre[:, None] + noise, 1e-3, None)
    good /= good.sum(-1, keepdims=True)
    wrong = np.eye(4)[(centre.argmax(1) + 1) % 4]  # all mass on a wrong class
    evil = np.repeat(wrong[:, None], bad, axis=1)
    return np.concatenate([good, evil], axis=1), good.mean(1)


@pytest.mark.parametrize("bad", [1, 2])
def test_robust_mean_drops_far_away_clients(bad):
    points, honest_mean = cronus_points(8, bad)
    means, keep = robust_mean(points, threshold=0.05, max_outlier_fraction=0.3)
    assert keep.shape == (5, 8 + bad)
    assert keep[:, :8].all() and not keep[:, 8:].any()
    assert np.abs(means - honest_mean).max() < 1e-9  # exactly the honest mean
    plain = points.mean(1)
    assert np.abs(plain - honest_mean).max() > 0.05  # what the filter protects against


def test_robust_mean_keeps_identical_honest_clients():
    points = np.repeat(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])[:, None], 9, axis=1)
    means, keep = robust_mean(points, threshold=0.05, max_outlier_fraction=0.3)
    assert keep.all()
    np.testing.assert_allclose(means, points[:, 0])


@pytest.mark.parametrize(
    ("k", "fraction", "limit"), [(10, 0.3, 3), (10, 0.1, 1), (9, 0.3, 2), (7, 0.49, 3), (3, 0.3, 0)]
)
def test_robust_mean_never_drops_more_than_the_fraction(k, fraction, limit):
    points, _ = cronus_points(k - k // 2, k // 2, seed=k)  # half the clients adversarial
    _, keep = robust_mean(points, threshold=0.0, max_outlier_fraction=fraction)
    assert ((~keep).sum(1) == limit).all()  # threshold 0: drops up to the limit
    _, keep = robust_mean(points, threshold=0.05, max_outlier_fraction=fraction)
    assert ((~keep).sum(1) <= limit).all()


def test_cronus_aggregate_filters_and_reports():
    points, honest_mean = cronus_points(8, 2)
    idx = np.arange(10, 15, dtype=np.int64)
    payloads = {
        cid: SoftLabels(idx, points[:, i].astype(np.float32))
        for i, cid in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    }
    server = make_server(config("strategy.name='cronus'"))
    strategy = CronusServer(CronusParams(threshold=0.05, max_outlier_fraction=0.3))
    agg = strategy.aggregate(server, payloads)
    np.testing.assert_array_equal(agg.idx, idx)
    np.testing.assert_allclose(
        agg.probs, honest_mean / honest_mean.sum(1, keepdims=True), atol=1e-6
    )
    agg.validate(num_classes=4, public_idx=idx)
    report = strategy.distill(server, agg)
    assert report == {f"filtered/{c}": (1.0 if c >= 8 else 0.0) for c in range(10)}


# --- FedDF: per-architecture averaging, ensemble distillation -------------------------
"""Each architecture's prototype is the size-weighted average of its clients' weights;
every prototype is then distilled towards the mean logits of all client models."""

FEDDF = ["strategy.name='feddf'", "clients.models=['mlp', 'logreg']", "server.epochs=10"]
SIZES = {0: 10, 1: 20, 2: 30, 3: 40}  # clients 0, 2: mlp; 1, 3: logreg


def feddf_round(weighted: bool = True):
    cfg = config(*FEDDF)
    server = make_server(cfg, num_examples=SIZES)
    strategy = FedDFServer(FedDFParams(weighted=weighted))
    clients = {cid: trained_client(cfg, cid, "mlp" if cid % 2 == 0 else "logreg") for cid in SIZES}
    payloads = {}
    for cid, node in clients.items():
        strategy.client_targets(server, cid, None)  # what the runtime does first
        payloads[cid] = node.weights()
        strategy.check_payload(server, cid, payloads[cid])
    return strategy, server, clients, payloads


@pytest.mark.parametrize("weighted", [True, False])
def test_feddf_prototypes_are_weighted_averages_per_architecture(weighted):
    strategy, server, clients, payloads = feddf_round(weighted)
    agg = strategy.aggregate(server, payloads)
    models = server.state["models"]
    assert sorted(models) == ["logreg", "mlp"]
    s = SIZES if weighted else dict.fromkeys(SIZES, 1)
    for arch, (a, b) in {"mlp": (0, 2), "logreg": (1, 3)}.items():
        wa, wb = state(clients[a].model), state(clients[b].model)
        got = state(models[arch])
        assert list(got) == list(wa)
        for name in wa:
            expected = (s[a] * wa[name] + s[b] * wb[name]) / (s[a] + s[b])
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
    # the ensemble: uniform mean of the four client models' logits on the public subset
    ens = np.mean([forward(n.model, server.public_x) for n in clients.values()], axis=0)
    assert isinstance(agg, Logits)
    np.testing.assert_array_equal(agg.idx, np.arange(60))
    np.testing.assert_allclose(agg.values, ens, rtol=1e-4, atol=1e-5)


def test_feddf_distill_moves_prototypes_toward_the_ensemble():
    strategy, server, _, payloads = feddf_round()
    agg = strategy.aggregate(server, payloads)
    ens = softmax(agg.values.astype(np.float64))
    models = server.state["models"]
    before = {a: kl(ens, softmax(forward(m, server.public_x))) for a, m in models.items()}
    metrics = strategy.distill(server, agg)
    after = {a: kl(ens, softmax(forward(m, server.public_x))) for a, m in models.items()}
    for arch in models:
        assert after[arch] < before[arch], arch
        assert f"kd/{arch}" in metrics and f"accuracy_before_distill/{arch}" in metrics
    assert 0 <= strategy.evaluate(server)["accuracy"] <= 1


def test_feddf_rejects_weights_of_the_other_architecture():
    strategy, server, _, payloads = feddf_round()
    with pytest.raises(PayloadError, match="tensor names differ"):
        strategy.check_payload(server, 0, payloads[1])  # logreg weights from an mlp client


# --- FedAvg ----------------------------------------------------------------------------
"""Weight averaging: one architecture, averaged by private-set size."""


def test_fedavg_check_config_requires_one_architecture():
    with pytest.raises(ConfigError, match="same architecture") as err:
        FedAvgServer.check_config(
            config("strategy.name='fedavg'", "clients.models=['mlp', 'logreg']")
        )
    assert err.value.field == "clients.models"
    with pytest.raises(ConfigError) as err:
        server_strategy(config("strategy.name='fedavg'", "clients.model_groups={'3'='logreg'}"))
    assert err.value.field == "clients.models"
    FedAvgServer.check_config(config("strategy.name='fedavg'"))  # all mlp: fine


def fedavg_round():
    cfg = config("strategy.name='fedavg'")
    server = make_server(cfg, num_examples={0: 5, 1: 15, 2: 30})
    strategy = FedAvgServer()
    strategy.setup(server)
    clients = {cid: trained_client(cfg, cid, "mlp", epochs=1 + cid) for cid in (0, 1, 2)}
    return strategy, server, clients


def test_fedavg_aggregate_is_the_num_examples_weighted_average():
    strategy, server, clients = fedavg_round()
    payloads = {cid: n.weights() for cid, n in clients.items()}
    for cid, p in payloads.items():
        strategy.check_payload(server, cid, p)
    avg = strategy.aggregate(server, payloads)
    w = [state(clients[c].model) for c in (0, 1, 2)]
    got = state(server.state["model"])
    for name in w[0]:
        expected = (5 * w[0][name] + 15 * w[1][name] + 30 * w[2][name]) / 50
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(avg.tensors[name], expected, rtol=1e-5, atol=1e-6)


def test_fedavg_check_payload_rejects_another_architecture():
    strategy, server, _ = fedavg_round()
    other = make_client(config("clients.models=['logreg']"), 0, spec="logreg").weights()
    with pytest.raises(PayloadError, match="tensor names differ"):
        strategy.check_payload(server, 0, other)
    wider = make_client(config(), 0, spec="mlp").weights()
    wider = type(wider)({**wider.tensors, "1.bias": np.zeros(7, np.float32)})
    with pytest.raises(PayloadError, match=r"1.bias is float32\(7,\)"):
        strategy.check_payload(server, 0, wider)


def test_fedavg_client_starts_from_the_global_model():
    cfg = config("strategy.name='fedavg'", "clients.local_epochs=0")
    strategy, server, _ = fedavg_round()
    node = make_client(cfg, 1, seed=99)
    targets = strategy.client_targets(server, 1, None)
    FedAvgClient().train(node, targets)
    for name, value in state(server.state["model"]).items():
        np.testing.assert_array_equal(state(node.model)[name], value)


# --- FedMD -----------------------------------------------------------------------------
"""Transfer learning on the labelled public set, then digest (L1 towards the consensus
logits) and revisit."""


def test_fedmd_setup_trains_on_the_labelled_public_set():
    cfg = config("strategy.name='fedmd'")
    node = make_client(cfg, 0, classes=[0])  # private data: one class only

    def public_accuracy():
        predicted = forward(node.model, node.public_x).argmax(1)
        return float((predicted == node.public_y.numpy()).mean())

    before = public_accuracy()
    FedMDClient(FedMDParams(transfer_epochs=5, private_epochs=0)).setup(node)
    assert before < 0.5 and public_accuracy() > 0.9


def test_fedmd_digest_reduces_l1_distance_to_the_consensus():
    cfg = config("strategy.name='fedmd'")
    node = make_client(cfg, 0)
    idx = np.arange(0, 60, 2, dtype=np.int64)
    others = [make_client(cfg, c, seed=50 + c) for c in (1, 2)]
    for o in others:
        o.train_private(epochs=3)
    server = make_server(config("strategy.name='fedmd'"))
    replies = {o.cid: FedMDClient().predict(o, idx) for o in others}
    consensus = FedMDServer().aggregate(server, replies)
    x = node.public_x[idx]
    by_hand = (forward(others[0].model, x) + forward(others[1].model, x)) / 2
    np.testing.assert_allclose(consensus.values, by_hand, rtol=1e-5, atol=1e-5)
    before = np.abs(forward(node.model, x) - by_hand).mean()
    params = FedMDParams(digest_epochs=20, revisit_epochs=0, loss="mae")
    metrics = FedMDClient(params).train(node, consensus)
    assert "digest" in metrics
    assert np.abs(forward(node.model, x) - by_hand).mean() < 0.5 * before


# --- strategy API and the new losses ----------------------------------------------------
"""Defaults of the plug-in API, the KD-target builder's loss choice, ProbKL and LogitMAE."""


def test_client_targets_default_returns_the_shared_targets():
    server = make_server(config(), teacher=True)
    shared = SoftLabels(np.arange(2), np.full((2, C), 1 / C, np.float32))
    strategy = DSFLServer()
    for cid in (0, 3):
        assert strategy.client_targets(server, cid, shared) is shared
    assert strategy.client_targets(server, 1, None) is None
    assert strategy.targets(server, shared, np.arange(5)) is shared


def test_public_kd_targets_picks_the_loss_by_payload_type():
    public_x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    idx = np.array([7, 2, 4])
    soft = public_kd_targets(public_x, SoftLabels(idx, np.full((3, 2), 0.5, np.float32)), 2.0)
    assert type(soft.loss) is ProbKL and soft.loss.temperature == 2.0
    torch.testing.assert_close(soft.x, public_x[[7, 2, 4]])
    torch.testing.assert_close(soft.logits, torch.full((3, 2), 0.5))
    logits = public_kd_targets(public_x, Logits(idx, np.ones((3, 2), np.float32)), 3.0)
    assert type(logits.loss) is SoftKL and logits.loss.temperature == 3.0
    mae = public_kd_targets(public_x, Logits(idx, np.ones((3, 2), np.float32)), 3.0, "mae")
    assert type(mae.loss) is LogitMAE
    with pytest.raises(TypeError, match="ClassLogits"):
        public_kd_targets(public_x, ClassLogits(np.eye(2), np.ones(2)), 1.0)


def test_new_losses_are_registered():
    assert KD_LOSSES.get("prob_kl") is ProbKL
    assert KD_LOSSES.get("mae") is LogitMAE


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_prob_kl_by_hand(t):
    s = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    q = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    p = np.exp(s / t) / np.exp(s / t).sum(1, keepdims=True)
    # T^2 * sum q log(q / p), mean over the batch (the 0 * log 0 term is 0)
    terms = [0.5 * np.log(0.5 / p[0, 0]) + 0.5 * np.log(0.5 / p[0, 1])]
    terms.append(sum(qi * np.log(qi / p[1, i]) for i, qi in enumerate(q[1])))
    expected = t * t * (terms[0] + terms[1]) / 2
    got = ProbKL(t)(torch.tensor(s), torch.tensor(q))
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_prob_kl_pinned_and_zero_at_the_target():
    # row (0, 0, 0) vs uniform q: KL = 0; row (ln 3, 0, 0) -> p = (0.6, 0.2, 0.2),
    # q = (0.6, 0.2, 0.2): 0 as well; q = (1, 0, 0): log(1 / 0.6)
    s = torch.tensor([[math.log(3.0), 0.0, 0.0]], dtype=torch.float64)
    same = torch.tensor([[0.6, 0.2, 0.2]], dtype=torch.float64)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(ProbKL()(s, same)) == pytest.approx(0, abs=1e-12)
    assert float(ProbKL()(s, one_hot)) == pytest.approx(math.log(1 / 0.6))
    assert float(ProbKL()(torch.zeros(1, 3), torch.full((1, 3), 1 / 3))) == pytest.approx(0)
    with pytest.raises(ValueError, match="temperature"):
        ProbKL(0.0)


def test_logit_mae_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [5.0, 4.0]])
    assert float(LogitMAE()(s, t)) == pytest.approx((1 + 2 + 2 + 0) / 4)


def test_public_probs_and_server_soft_labels_by_hand():
    cfg = config()
    node = make_client(cfg, 0)
    idx = np.array([4, 1, 9])
    logits = forward(node.model, node.public_x[idx])
    got = node.public_probs(idx, temperature=2.0)
    np.testing.assert_array_equal(got.idx, idx)
    np.testing.assert_allclose(got.probs, softmax(logits, 2.0), rtol=1e-5)
    server = make_server(cfg)
    labels = server.soft_labels(node.model, idx, temperature=0.5)
    np.testing.assert_allclose(labels.probs, softmax(logits, 0.5), rtol=1e-5)


def test_clients_of_feddf_run_fedavgs_client_side_despite_server_only_params():
    cfg = config("strategy.name='feddf'", "strategy.temperature=2.0")
    assert type(client_strategy(cfg, 0)) is FedAvgClient
    assert server_strategy(cfg).params.temperature == 2.0


# --- FD: per-class means collected during local training (Jeong et al. 2018, Alg. 1) ---


def test_fd_collects_class_means_from_the_training_steps_outputs():
    """The payload averages, per label, exactly the outputs the training steps produced
    (training mode, the model changing between steps), every epoch's."""
    cfg = config("clients.models=['mlp']", "clients.local_epochs=2", "clients.lr=0.05")
    node = make_client(cfg, 0, classes=[0, 0, 2, 0, 2])  # class 1 absent
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    node.model.register_forward_hook(lambda m, args, out: seen.append((args[0], out.detach())))
    client = FDClient(FDParams(softmax=True))
    client.train(node, None)
    payload = client.predict(node, np.array([], dtype=np.int64))
    assert isinstance(payload, ClassLogits)
    rows = {tuple(x.tolist()): int(y) for x, y in zip(node.x, node.y, strict=True)}
    sums, counts = np.zeros((C, C)), np.zeros(C)
    for x, out in seen:
        for xi, oi in zip(x, out, strict=True):
            c = rows[tuple(xi.tolist())]
            sums[c] += torch.softmax(oi.double(), -1).numpy()
            counts[c] += 1
    np.testing.assert_array_equal(payload.counts, counts)
    np.testing.assert_array_equal(payload.counts, [2 * 29, 0, 2 * 19])  # 2 epochs of 48 rows
    np.testing.assert_allclose(payload.means[0], sums[0] / counts[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(payload.means[1], [0, 0, 0])
    # not what the trained model gives afterwards in eval mode (FD's collect = "after")
    after = node.class_mean_logits(softmax=True)
    assert not np.allclose(after.means[0], payload.means[0], atol=1e-4)
    assert FDClient(FDParams(collect="after")).predict(node, np.array([])).means[0] == (
        pytest.approx(after.means[0])
    )


def test_fd_collect_must_be_training_or_after():
    with pytest.raises(ConfigError, match="collect") as err:
        FDParams(collect="during")
    assert err.value.field == "collect"
