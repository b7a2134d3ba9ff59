"""Server aggregators (fedkd.aggregators) and ServerNode.combine, which applies them.

Expected values are written out by hand or computed by a few independent lines of
NumPy; ``mean`` is pinned bit for bit to :meth:`fedkd.payloads.Logits.mean`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.aggregators import (
    AGGREGATORS,
    ClippedMean,
    Mean,
    Median,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
)
from fedkd.config import Config, ConfigError, ServerConfig, Spec
from fedkd.payloads import Logits, PayloadError, SoftLabels
from fedkd.registry import UnknownNameError
from fedkd.strategy import ServerNode

C = 4
NAMES = ["mean", "weighted_mean", "median", "trimmed_mean", "clipped_mean"]


def stacked(payloads) -> np.ndarray:
    return np.stack([p.values for p in payloads]).astype(np.float64)


def random_logits(n: int, rows: int = 7, seed: int = 0) -> list[Logits]:
    rng = np.random.default_rng(seed)
    idx = np.arange(2, 2 + rows, dtype=np.int64)
    return [Logits(idx, rng.standard_normal((rows, C)).astype(np.float32)) for _ in range(n)]


# --- the aggregators -------------------------------------------------------------------


def test_registered_names():
    assert set(NAMES) <= set(AGGREGATORS.names())


def test_mean_is_bit_identical_to_logits_mean():
    payloads = random_logits(5)
    for weights in (None, [1.0, 2.0, 3.0, 4.0, 5.0], [10, 0, 3, 1, 7]):
        expected = Logits.mean(payloads, weights).values
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        got = Mean()(stacked(payloads), w).astype(np.float32)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
    assert WeightedMean.by_size and not Mean.by_size


def test_median_by_hand():
    values = np.array([[1.0, 5.0], [3.0, -1.0], [2.0, 100.0]])
    np.testing.assert_array_equal(Median()(values), [2.0, 5.0])
    values = np.array([[1.0], [2.0], [3.0], [10.0]])  # even n: mean of the middle two
    np.testing.assert_array_equal(Median()(values), [2.5])
    np.testing.assert_array_equal(Median()(values, np.array([100.0, 0, 0, 0])), [2.5])  # no weights


def test_trimmed_mean_by_hand():
    values = np.array([[1.0, -7.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    np.testing.assert_allclose(TrimmedMean(0.2)(values), [3.0, 1.0])  # floor(1.0) = 1 each end
    np.testing.assert_allclose(TrimmedMean(0.4)(values), [3.0, 1.0])  # 2 each end: the median
    np.testing.assert_allclose(TrimmedMean(0.1)(values), [22.0, -0.2])  # floor(0.5) = 0: mean
    np.testing.assert_allclose(TrimmedMean(0.0)(values), values.mean(axis=0))
    ten = np.arange(10, dtype=np.float64)[:, None] ** 2  # 0, 1, 4, ..., 81
    np.testing.assert_allclose(TrimmedMean(0.25)(ten), [(4 + 9 + 16 + 25 + 36 + 49) / 6])
    assert TrimmedMean().beta == 0.1


def test_clipped_mean_by_hand():
    values = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])  # norms 5, 1, 10
    # clip 5: [3, 4], [0, 1], [3, 4] -> mean [2, 3]
    np.testing.assert_allclose(ClippedMean(5.0)(values), [2.0, 3.0])
    np.testing.assert_allclose(ClippedMean()(values), [2.0, 3.0])  # median norm = 5
    # clip 1: [0.6, 0.8], [0, 1], [0.6, 0.8] -> mean [0.4, 2.6 / 3]
    np.testing.assert_allclose(ClippedMean(1.0)(values), [0.4, 2.6 / 3])
    np.testing.assert_allclose(ClippedMean(100.0)(values), values.mean(axis=0))
    # the norm is over each client's whole array, not per row
    grid = np.array([[[3.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.5]], [[6.0, 0.0], [0.0, 8.0]]])
    expected = (grid[0] + grid[1] + grid[2] * 0.5) / 3
    np.testing.assert_allclose(ClippedMean()(grid), expected)
    assert ClippedMean()(grid).shape == (2, 2)


def test_robust_aggregators_resist_scaled_clients():
    """3 of 10 clients send their logits x100: the mean moves far, robust ones stay close."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 10))
    honest = base + 0.1 * rng.standard_normal((10, 50, 10))
    values = honest.copy()
    values[[1, 4, 8]] *= 100
    target = honest[[i for i in range(10) if i not in (1, 4, 8)]].mean(axis=0)

    def distance(agg) -> float:
        return float(np.linalg.norm(agg(values) - target) / np.linalg.norm(target))

    # distances relative to the honest mean's norm (honest noise: 0.1 on values of std 1)
    assert distance(Mean()) > 10
    assert distance(Median()) < 0.1  # within the honest values' order statistics
    assert distance(TrimmedMean(beta=0.3)) < 0.1
    assert distance(TrimmedMean(beta=0.1)) > 1  # trims 1 of 3 attackers per end: not enough
    assert distance(ClippedMean()) < 0.1  # scaled honest logits clip back to honest ones


def test_make_aggregator_errors():
    with pytest.raises(UnknownNameError) as err:
        make_aggregator(Spec("nope"))
    assert "unknown aggregator 'nope'" in str(err.value)
    for name in NAMES:
        assert name in str(err.value)
    with pytest.raises(ConfigError) as err:
        make_aggregator(Spec("median", {"beta": 0.1}))
    assert err.value.field == "server.aggregator.beta"
    with pytest.raises(ConfigError) as err:
        make_aggregator(Spec("trimmed_mean", {"bta": 0.1}))
    assert err.value.field == "server.aggregator.bta" and "beta" in err.value.reason
    for beta in (0.5, -0.1, 0.9):
        with pytest.raises(ConfigError, match="beta") as err:
            make_aggregator(Spec("trimmed_mean", {"beta": beta}))
        assert err.value.field == "server.aggregator"
    with pytest.raises(ConfigError, match="clip") as err:
        make_aggregator(Spec("clipped_mean", {"clip": -1.0}), "x.agg")
    assert err.value.field == "x.agg"
    assert isinstance(make_aggregator(Spec("trimmed_mean", {"beta": 0.3})), TrimmedMean)
    assert make_aggregator(Spec("clipped_mean", {"clip": 2.0})).clip == 2.0


# --- ServerNode.combine ----------------------------------------------------------------


def make_server(aggregator: Spec, num_examples: dict[int, int] | None = None) -> ServerNode:
    """A server node as fedkd.federation builds it, on tiny synthetic tensors."""
    config = Config(server=ServerConfig(aggregator=aggregator))
    x = torch.zeros(20, 3)
    return ServerNode(
        round=1,
        teacher=None,
        optimizer=None,
        public_x=x,
        test_x=x,
        test_y=torch.zeros(20, dtype=torch.long),
        num_classes=C,
        config=config,
        generator=torch.Generator().manual_seed(0),
        num_examples=dict(num_examples or {}),
    )


SPECS = {
    "mean": Spec("mean"),
    "weighted_mean": Spec("weighted_mean"),
    "median": Spec("median"),
    "trimmed_mean": Spec("trimmed_mean", {"beta": 0.25}),
    "clipped_mean": Spec("clipped_mean"),
}
SIZES = {0: 10, 2: 30, 3: 5, 5: 60, 9: 1000}  # client 9 is not in the round


def by_hand(name: str, v: np.ndarray, w: np.ndarray | None, sizes: np.ndarray) -> np.ndarray:
    """Each aggregator written out independently, in float64."""
    if name == "mean":
        w = np.ones(len(v)) if w is None else w
        return (v * (w / w.sum())[:, None, None]).sum(axis=0)
    if name == "weighted_mean":
        return (v * (sizes / sizes.sum())[:, None, None]).sum(axis=0)
    if name == "median":
        return np.median(v, axis=0)
    if name == "trimmed_mean":  # n = 4, beta 0.25: one from each end
        return np.sort(v, axis=0)[1:3].mean(axis=0)
    norms = np.sqrt((v**2).sum(axis=(1, 2)))
    bound = np.median(norms)
    return (v * np.minimum(1, bound / norms)[:, None, None]).mean(axis=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weights", [None, [1.0, 4.0, 2.0, 3.0]])
def test_combine_logits(name, weights):
    server = make_server(SPECS[name], SIZES)
    logits = dict(zip([0, 2, 3, 5], random_logits(4, seed=1), strict=True))
    out = server.combine(logits, weights)
    assert isinstance(out, Logits) and out.values.dtype == np.float32
    first = logits[0]
    np.testing.assert_array_equal(out.idx, first.idx)
    assert not np.shares_memory(out.idx, first.idx)
    v = stacked(logits.values())
    sizes = np.array([10, 30, 5, 60], np.float64)
    w = None if weights is None else np.asarray(weights, np.float64)
    np.testing.assert_allclose(out.values, by_hand(name, v, w, sizes), rtol=1e-6, atol=1e-6)
    assert server.aggregations == 1
    if name == "mean":  # the default keeps Logits.mean's bits
        assert out.values.tobytes() == Logits.mean(list(logits.values()), weights).values.tobytes()
    if name == "weighted_mean":  # private-set sizes, whatever the strategy passes
        expected = Logits.mean(list(logits.values()), [10, 30, 5, 60]).values
        assert out.values.tobytes() == expected.tobytes()
    if name in ("median", "trimmed_mean", "clipped_mean"):  # robust: weights ignored
        again = make_server(SPECS[name], SIZES).combine(logits)
        assert out.values.tobytes() == again.values.tobytes()


def soft(seed: int, rows: int = 6) -> SoftLabels:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(C) * 0.5, size=rows)
    return SoftLabels(np.arange(rows, dtype=np.int64), p.astype(np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_combine_soft_labels_gives_probability_rows(name):
    server = make_server(SPECS[name], SIZES)
    labels = {cid: soft(cid) for cid in (0, 2, 3, 5)}
    weights = [1.0, 4.0, 2.0, 3.0]
    out = server.combine(labels, weights)
    assert isinstance(out, SoftLabels) and out.probs.dtype == np.float32
    out.validate(num_classes=C, public_idx=labels[0].idx)
    v = np.stack([p.probs for p in labels.values()]).astype(np.float64)
    raw = by_hand(name, v, np.asarray(weights), np.array([10, 30, 5, 60], np.float64))
    expected = np.clip(raw, 0, None)
    expected /= expected.sum(axis=1, keepdims=True)  # renormalised (a no-op for the means)
    np.testing.assert_allclose(out.probs, expected, atol=1e-6)
    if name == "mean":
        ref = SoftLabels.mean(list(labels.values()), weights).probs
        assert out.probs.tobytes() == ref.tobytes()
    if name == "weighted_mean":
        ref = SoftLabels.mean(list(labels.values()), [10, 30, 5, 60]).probs
        assert out.probs.tobytes() == ref.tobytes()


def test_combine_robust_soft_labels_resist_a_flipped_minority():
    """Two of seven clients move their mass to the least likely class; the median keeps
    the honest argmax, the mean does not."""
    idx = np.arange(3, dtype=np.int64)
    honest = np.array([[0.7, 0.2, 0.05, 0.05]] * 3, np.float32)
    bad = np.array([[0.0, 0.0, 0.0, 1.0]] * 3, np.float32)
    labels = {c: SoftLabels(idx, honest if c < 5 else bad) for c in range(7)}
    for name in ("median", "trimmed_mean"):
        out = make_server(Spec(name, {"beta": 0.3} if name == "trimmed_mean" else {})).combine(
            labels
        )
        out.validate(num_classes=C)
        np.testing.assert_allclose(out.probs, honest, atol=1e-6)
    mean = make_server(Spec("mean")).combine(labels)
    assert abs(mean.probs[0, 3] - (5 * 0.05 + 2) / 7) < 1e-6


def test_combine_errors():
    server = make_server(Spec("median"))
    with pytest.raises(ValueError, match="zero payloads"):
        server.combine({})
    a = random_logits(1)[0]
    with pytest.raises(TypeError, match="Logits or SoftLabels"):
        server.combine({0: a, 1: SoftLabels(a.idx, softmax_like(a.values))})
    shifted = Logits(a.idx + 1, a.values)
    with pytest.raises(PayloadError, match="different public indices"):
        server.combine({0: a, 1: shifted})
    with pytest.raises(KeyError):  # weighted_mean needs every client's private-set size
        make_server(Spec("weighted_mean"), {0: 10}).combine({0: a, 1: a})
    with pytest.raises(ConfigError, match="server.aggregator.beta"):
        make_server(Spec("median", {"beta": 0.2})).combine({0: a})


def softmax_like(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_combine_disagreeing_one_hot_rows_still_give_probability_rows(name):
    """E.g. CFD with 1-bit soft labels: three clients, three different argmaxes."""
    idx = np.arange(1, dtype=np.int64)
    labels = {c: SoftLabels(idx, np.eye(C, dtype=np.float32)[[c]]) for c in range(3)}
    spec = Spec(name, {"beta": 0.34} if name == "trimmed_mean" else {})
    combined = make_server(spec).combine(labels)
    combined.validate(num_classes=C)  # a zero row falls back to the clients' mean row
    np.testing.assert_allclose(combined.probs[0, :3], 1 / 3, rtol=1e-6)
