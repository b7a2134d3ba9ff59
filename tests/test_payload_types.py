"""The algorithm suite's payload types: soft labels, per-class logits, quantized soft
labels and model weights (validation, quantization, size accounting, wire format,
averaging). Every expected value is worked by hand or by a few lines of NumPy here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.payloads import (
    PAYLOADS,
    ClassLogits,
    PayloadError,
    QuantizedSoftLabels,
    SoftLabels,
    Weights,
    _pack_codes,
    _unpack_codes,
)
from fedkd.wire import payload_to_record, record_to_payload


def random_probs(rows: int, classes: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Random probability rows, some peaked and some flat (Dirichlet(0.5))."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(classes, 0.5), size=rows).astype(dtype)


def pack_by_hand(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented wire layout, written independently: codes in row-major order,
    each code least-significant bit first, the bit stream filled into bytes from the
    most significant bit (``np.packbits``' default order), zero-padded."""
    stream = [(int(c) >> b) & 1 for c in codes.reshape(-1) for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    out = [int("".join(map(str, stream[i : i + 8])), 2) for i in range(0, len(stream), 8)]
    return np.array(out, dtype=np.uint8)


def quantized(codes: np.ndarray, bits: int, idx=None) -> QuantizedSoftLabels:
    """A payload holding the given integer codes (packed by hand, not by the library)."""
    rows, classes = codes.shape
    idx = np.arange(rows, dtype=np.int32) if idx is None else idx
    return QuantizedSoftLabels(
        idx, pack_by_hand(codes, bits), np.array([bits, rows, classes], np.int32)
    )


def assert_bit_exact(a: np.ndarray, b: np.ndarray, name: str = "") -> None:
    assert a.dtype == b.dtype, name
    assert a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name


# --- SoftLabels ----------------------------------------------------------------------


def test_soft_labels_valid_rows_pass():
    idx = np.array([3, 7], np.int64)
    p = SoftLabels(idx, np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32))
    p.validate(num_classes=3)
    p.validate(num_classes=3, public_idx=np.array([3, 7]))
    # rows may be off by float rounding (tolerance 1e-3)
    SoftLabels(idx, np.array([[0.2, 0.3, 0.5005], [1, 0, 0]], np.float32)).validate(num_classes=3)
    # int32 indices equal to the requested int64 ones are the same indices
    SoftLabels(idx.astype(np.int32), p.probs).validate(num_classes=3, public_idx=idx)


@pytest.mark.parametrize(
    ("probs", "idx", "public_idx", "message"),
    [
        ([[0.2, 0.3, 0.4], [1, 0, 0]], [3, 7], None, "sum to 1"),
        ([[0.5, 0.5, 0.5], [1, 0, 0]], [3, 7], None, "sum to 1"),
        ([[0.2, 0.3, 0.5], [0.99, 0, 0]], [3, 7], None, r"off by up to 0.01\)"),
        ([[1.5, -0.5, 0.0], [1, 0, 0]], [3, 7], None, r"lie in \[0, 1\]"),
        ([[1.0005, 0.0, 0.0], [1, 0, 0]], [3, 7], None, r"lie in \[0, 1\]"),
        ([[-0.0005, 0.5005, 0.5], [1, 0, 0]], [3, 7], None, r"lie in \[0, 1\]"),
        ([[0.5, 0.5], [1, 0]], [3, 7], None, r"shape \(2, 2\), expected \(2, 3\)"),
        ([[0.2, 0.3, 0.5]], [3, 7], None, r"shape \(1, 3\), expected \(2, 3\)"),
        ([[0.2, 0.3, 0.5], [1, 0, 0]], [3, 7], [3, 8], "other public indices"),
        ([[0.2, 0.3, 0.5], [1, 0, 0]], [3, 7], [3, 7, 9], "other public indices"),
        ([[0.2, 0.3, np.nan], [1, 0, 0]], [3, 7], None, "non-finite"),
    ],
)
def test_soft_labels_validation_rejects(probs, idx, public_idx, message):
    p = SoftLabels(np.array(idx, np.int64), np.array(probs, np.float32))
    pub = None if public_idx is None else np.array(public_idx, np.int64)
    with pytest.raises(PayloadError, match=message):
        p.validate(num_classes=3, public_idx=pub)


def test_soft_labels_validation_rejects_bad_idx_and_dtype():
    probs = np.array([[0.2, 0.8]], np.float32)
    with pytest.raises(PayloadError, match="1-D integer"):
        SoftLabels(np.array([0.0]), probs).validate(num_classes=2)
    with pytest.raises(PayloadError, match="floating point"):
        SoftLabels(np.array([0]), np.array([[0, 1]], np.int64)).validate(num_classes=2)


def test_soft_labels_mean_by_hand():
    idx = np.array([0, 4], np.int64)
    a = SoftLabels(idx, np.array([[0.5, 0.5], [1.0, 0.0]], np.float32))
    b = SoftLabels(idx, np.array([[0.1, 0.9], [0.0, 1.0]], np.float32))
    np.testing.assert_allclose(SoftLabels.mean([a, b]).probs, [[0.3, 0.7], [0.5, 0.5]])
    # weights 1 : 3 -> (1 * a + 3 * b) / 4
    np.testing.assert_allclose(
        SoftLabels.mean([a, b], [1, 3]).probs, [[0.2, 0.8], [0.25, 0.75]], rtol=1e-6
    )


# --- ClassLogits ---------------------------------------------------------------------


def test_class_logits_valid_passes_and_ignores_public_idx():
    means = np.arange(9, dtype=np.float32).reshape(3, 3)
    ClassLogits(means, np.array([2.0, 0.0, 5.0], np.float32)).validate(num_classes=3)
    ClassLogits(means, np.array([2, 0, 5], np.int64)).validate(
        num_classes=3, public_idx=np.array([1, 2])
    )


@pytest.mark.parametrize(
    ("means", "counts", "message"),
    [
        (np.zeros((3, 2)), np.ones(3), r"means have shape \(3, 2\), expected \(3, 3\)"),
        (np.zeros((2, 2)), np.ones(3), r"means have shape \(2, 2\)"),
        (np.zeros((3, 3)), np.ones(2), r"counts have shape \(2,\), expected \(3,\)"),
        (np.zeros((3, 3)), np.ones((3, 1)), "counts have shape"),
        (np.zeros((3, 3)), np.array([1.0, -1.0, 0.0]), "counts must be >= 0"),
        (np.full((3, 3), np.inf), np.ones(3), "means has 9 non-finite"),
        (np.zeros((3, 3)), np.array([1.0, np.nan, 0.0]), "counts has 1 non-finite"),
        (np.zeros((3, 3), np.int64), np.ones(3), "means must be floating point"),
    ],
)
def test_class_logits_validation_rejects(means, counts, message):
    with pytest.raises(PayloadError, match=message):
        ClassLogits(means, counts).validate(num_classes=3)


# --- QuantizedSoftLabels -------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantization_error_bound(bits, dtype):
    """Every entry is rounded down or up to the grid l / (2**bits - 1), so the error is
    below one grid step; the codes of a row add up to exactly 2**bits - 1."""
    levels = 2**bits - 1
    probs = random_probs(300, 7, seed=bits, dtype=dtype)
    q = QuantizedSoftLabels.quantize(SoftLabels(np.arange(300), probs), bits)
    deq = q.dequantize().astype(np.float64)
    err = np.abs(deq - probs.astype(np.float64))
    assert err.max() < 1 / levels
    codes = np.rint(deq * levels)
    np.testing.assert_allclose(deq * levels, codes, atol=1e-3)  # on the grid
    np.testing.assert_array_equal(codes.sum(axis=1), levels)  # rows sum to 1 exactly
    # floor or ceil of the scaled probability, never further
    scaled = probs.astype(np.float64) / probs.astype(np.float64).sum(1, keepdims=True) * levels
    assert (codes >= np.floor(scaled + 1e-9)).all() and (codes <= np.ceil(scaled - 1e-9)).all()


def test_row_constraint_can_exceed_half_a_grid_step():
    """Not plain per-entry rounding (whose error is at most ``1 / (2 * (2**bits - 1))``):
    the row must sum to 1, so at one bit (0.4, 0.3, 0.3) becomes the one-hot argmax,
    an error of 0.6 on the first entry. Pinned so a change of quantizer is noticed."""
    q = QuantizedSoftLabels.quantize(SoftLabels(np.arange(1), np.array([[0.4, 0.3, 0.3]])), 1)
    np.testing.assert_array_equal(q.dequantize(), [[1.0, 0.0, 0.0]])
    assert np.abs(q.dequantize() - [0.4, 0.3, 0.3]).max() > 1 / (2 * (2**1 - 1))


@pytest.mark.parametrize(
    ("bits", "probs", "expected_codes"),
    [
        (1, [0.2, 0.5, 0.3], [0, 1, 0]),  # one bit: one-hot argmax
        (1, [0.45, 0.1, 0.45], [1, 0, 0]),  # tie: the lower class index
        (1, [0.0, 0.0, 0.0], [1, 0, 0]),  # all-zero row: uniform, then the tie rule
        # 3 levels: 3 * p = (1.5, 0.9, 0.6) -> floors (1, 0, 0), two units left go to the
        # largest remainders 0.9 and 0.6
        (2, [0.5, 0.3, 0.2], [1, 1, 1]),
        # 3 * p = (2.4, 0.3, 0.3) -> floors (2, 0, 0), one unit left to the remainder 0.4
        (2, [0.8, 0.1, 0.1], [3, 0, 0]),
        # 15 * p = (3.75, 11.25, 0) -> (3, 11, 0), one unit to 0.75
        (4, [0.25, 0.75, 0.0], [4, 11, 0]),
        # 255 * (0.1, 0.2, 0.7) = (25.5, 51, 178.5) -> (25, 51, 178), one unit to the
        # tied remainders 0.5: the lower class index
        (8, [0.1, 0.2, 0.7], [26, 51, 178]),
    ],
)
def test_quantization_by_hand(bits, probs, expected_codes):
    q = QuantizedSoftLabels.quantize(SoftLabels(np.arange(1), np.array([probs])), bits)
    np.testing.assert_allclose(
        q.dequantize(), [np.array(expected_codes) / (2**bits - 1)], rtol=1e-6, atol=1e-7
    )
    assert_bit_exact(q.packed, pack_by_hand(np.array([expected_codes]), bits))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_quantization_is_the_l1_closest_grid_row_summing_to_one(bits):
    """Brute force over every code vector that sums to 2**bits - 1 (4 classes)."""
    levels = 2**bits - 1
    grid = np.array([c for c in itertools.product(range(levels + 1), repeat=4) if sum(c) == levels])
    probs = random_probs(40, 4, seed=10 + bits, dtype=np.float64)
    q = QuantizedSoftLabels.quantize(SoftLabels(np.arange(40), probs), bits)
    got = np.abs(q.dequantize().astype(np.float64) - probs).sum(axis=1)
    best = np.abs(grid[None] / levels - probs[:, None]).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(got, best, atol=1e-6)


def test_quantize_rejects_bad_bits():
    labels = SoftLabels(np.arange(1), np.array([[0.5, 0.5]]))
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits must be in 1..16"):
            QuantizedSoftLabels.quantize(labels, bits)


@pytest.mark.parametrize(("rows", "classes", "bits"), [(5, 3, 3), (10, 10, 1), (7, 10, 16)])
def test_quantized_nbytes_by_hand(rows, classes, bits):
    """idx as int32 (4 bytes each) + ceil(rows * classes * bits / 8) + 3 int32 of meta."""
    labels = SoftLabels(np.arange(rows, dtype=np.int64), random_probs(rows, classes, seed=0))
    q = QuantizedSoftLabels.quantize(labels, bits)
    assert q.idx.dtype == np.int32 and q.packed.dtype == np.uint8
    assert q.nbytes == math.ceil(rows * classes * bits / 8) + 12  # indices are derived
    q.validate(num_classes=classes, public_idx=np.arange(rows, dtype=np.int64))


def test_quantized_nbytes_pinned():
    # 5 rows x 3 classes x 3 bits = 45 bits -> 6 bytes; meta 12 bytes; idx not counted
    labels = SoftLabels(np.arange(5), random_probs(5, 3, seed=1))
    assert QuantizedSoftLabels.quantize(labels, 3).nbytes == 18


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 64])
def test_code_packing_round_trip_is_exact(bits, count):
    codes = np.random.default_rng(bits * 100 + count).integers(0, 2**bits, size=count)
    packed = _pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(count * bits / 8),)
    assert_bit_exact(packed, pack_by_hand(codes, bits))
    np.testing.assert_array_equal(_unpack_codes(packed, bits, count), codes)


def test_code_packing_layout_pinned():
    # codes (3, 1, 2) at 2 bits, LSB first: 1 1 | 1 0 | 0 1 | pad 0 0 -> 0b11100100
    assert _pack_codes(np.array([3, 1, 2]), 2).tolist() == [0b11100100]
    # codes (0, 1, 0) at 1 bit: 0 1 0 | pad -> 0b01000000
    assert _pack_codes(np.array([0, 1, 0]), 1).tolist() == [64]


def test_dequantize_reads_hand_packed_codes():
    codes = np.array([[0, 3, 12], [15, 0, 0]])
    q = quantized(codes, 4)
    np.testing.assert_allclose(q.dequantize(), codes / 15, rtol=1e-6)
    q.validate(num_classes=3, public_idx=np.array([0, 1]))


def test_all_zero_row_becomes_uniform_in_soft_labels():
    codes = np.array([[0, 0, 0, 0], [1, 2, 0, 1], [3, 0, 0, 0]])  # 2 bits, 3 levels
    labels = quantized(codes, 2, idx=np.array([5, 6, 9], np.int32)).soft_labels()
    assert isinstance(labels, SoftLabels)
    assert labels.idx.dtype == np.int64
    np.testing.assert_array_equal(labels.idx, [5, 6, 9])
    np.testing.assert_allclose(
        labels.probs, [[0.25] * 4, [0.25, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0]], rtol=1e-6
    )
    labels.validate(num_classes=4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q: QuantizedSoftLabels(q.idx, q.packed[:-1], q.meta), "packed must be 2 uint8"),
        (
            lambda q: QuantizedSoftLabels(q.idx, q.packed.astype(np.int16), q.meta),
            "packed must be 2 uint8",
        ),
        (
            lambda q: QuantizedSoftLabels(q.idx, q.packed, np.array([0, 2, 3], np.int32)),
            "bits must be in 1..16",
        ),
        (
            lambda q: QuantizedSoftLabels(q.idx, q.packed, np.array([4, 2, 3, 0], np.int32)),
            "meta must be 3 integers",
        ),
        (
            lambda q: QuantizedSoftLabels(q.idx, q.packed, q.meta.astype(np.float32)),
            "meta must be 3 integers",
        ),
        (lambda q: QuantizedSoftLabels(q.idx[:1], q.packed, q.meta), r"shape \(2, 3\)"),
    ],
)
def test_quantized_validation_rejects(mutate, message):
    q = quantized(np.array([[0, 3, 12], [15, 0, 0]]), 4)  # 24 bits -> 3 bytes
    message = message.replace("packed must be 2", "packed must be 3")
    with pytest.raises(PayloadError, match=message):
        mutate(q).validate(num_classes=3)


def test_quantized_validation_checks_classes_and_indices():
    q = quantized(np.array([[0, 3, 12], [15, 0, 0]]), 4)
    with pytest.raises(PayloadError, match=r"expected \(2, 4\)"):
        q.validate(num_classes=4)
    with pytest.raises(PayloadError, match="other public indices"):
        q.validate(num_classes=3, public_idx=np.array([0, 2]))


# --- Weights -------------------------------------------------------------------------


def two_weights() -> tuple[Weights, Weights]:
    a = Weights(
        {
            "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
            "b": np.array([0.0, 10.0], np.float32),
            "steps": np.array(5, np.int64),
        }
    )
    b = Weights(
        {
            "w": np.array([[5.0, 6.0], [7.0, 8.0]], np.float32),
            "b": np.array([4.0, -10.0], np.float32),
            "steps": np.array(9, np.int64),
        }
    )
    return a, b


def test_weights_mean_by_hand():
    a, b = two_weights()
    # weights 1 : 3 -> (a + 3 b) / 4
    avg = Weights.mean([a, b], [1, 3])
    np.testing.assert_allclose(avg.tensors["w"], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_allclose(avg.tensors["b"], [3.0, -5.0])
    assert avg.tensors["w"].dtype == np.float32
    # integer buffers (BatchNorm's num_batches_tracked) take the first payload's value
    assert avg.tensors["steps"].dtype == np.int64 and int(avg.tensors["steps"]) == 5
    plain = Weights.mean([a, b])
    np.testing.assert_allclose(plain.tensors["w"], [[3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_allclose(plain.tensors["b"], [2.0, 0.0])
    assert list(avg.tensors) == ["w", "b", "steps"]


def test_weights_mean_rejects_nothing_and_mismatch():
    a, _ = two_weights()
    with pytest.raises(ValueError, match="zero payloads"):
        Weights.mean([])
    other = Weights({**a.tensors, "w": np.zeros((2, 3), np.float32)})
    with pytest.raises(PayloadError, match="w is float32"):
        Weights.mean([a, other])


def test_check_like():
    a, b = two_weights()
    b.check_like(a)
    cases = [
        ({**a.tensors, "w": np.zeros((3, 2), np.float32)}, r"w is float32\(3, 2\), expected"),
        ({**a.tensors, "w": a.tensors["w"].astype(np.float64)}, "w is float64"),
        ({"w": a.tensors["w"], "b": a.tensors["b"]}, r"missing \['steps'\]"),
        ({**a.tensors, "extra": np.zeros(1, np.float32)}, r"unexpected \['extra'\]"),
        ({"v": a.tensors["w"], "b": a.tensors["b"], "steps": a.tensors["steps"]}, "names differ"),
    ]
    for tensors, message in cases:
        with pytest.raises(PayloadError, match=message):
            Weights(tensors).check_like(a)


def test_weights_validate():
    a, _ = two_weights()
    a.validate(num_classes=10)
    with pytest.raises(PayloadError, match="empty"):
        Weights({}).validate(num_classes=10)
    with pytest.raises(PayloadError, match="w has 1 non-finite"):
        Weights({**a.tensors, "w": np.array([1.0, np.nan])}).validate(num_classes=10)
    with pytest.raises(PayloadError, match="unsupported dtype"):
        Weights({**a.tensors, "c": np.array([1j])}).validate(num_classes=10)


# --- wire format ---------------------------------------------------------------------


def new_payloads() -> list:
    probs = random_probs(6, 4, seed=3)
    idx = np.array([1, 4, 9, 16, 25, 36], np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return [
        SoftLabels(idx, probs),
        ClassLogits(np.arange(16, dtype=np.float32).reshape(4, 4), np.array([3, 0, 1, 2.0])),
        QuantizedSoftLabels.quantize(SoftLabels(idx, probs), 3),
        Weights({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}),
    ]


@pytest.mark.parametrize("index", range(4), ids=["soft", "class", "quantized", "weights"])
def test_wire_round_trip_of_new_payload_kinds(index):
    payload = new_payloads()[index]
    assert PAYLOADS.get(payload.kind) is type(payload)
    back = record_to_payload(payload.kind, payload_to_record(payload))
    assert type(back) is type(payload)
    assert list(back.arrays()) == list(payload.arrays())
    for name, a in payload.arrays().items():
        assert_bit_exact(a, back.arrays()[name], name)
    assert back.nbytes == payload.nbytes
    if isinstance(back, Weights):
        back.check_like(payload)


def test_wire_round_trip_of_quantized_labels_decodes_the_same():
    q = new_payloads()[2]
    back = record_to_payload(q.kind, payload_to_record(q))
    back.validate(num_classes=4, public_idx=np.array([1, 4, 9, 16, 25, 36]))
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())


def test_wire_round_trip_keeps_zero_dim_buffers():
    """Regression: ``np.ascontiguousarray`` in ``fedkd.wire`` made 0-d arrays 1-d, so
    BatchNorm's ``num_batches_tracked`` came back as shape (1,) (fixed in d8497a2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    w = Weights({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    assert w.tensors["1.num_batches_tracked"].shape == ()
    back = record_to_payload("weights", payload_to_record(w))
    assert back.tensors["1.num_batches_tracked"].shape == ()
    back.check_like(w)  # what FedAvg's check_payload does on arrival
    model.load_state_dict({k: torch.as_tensor(v) for k, v in back.tensors.items()})
