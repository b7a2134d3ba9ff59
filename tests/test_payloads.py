"""Typed payloads: wire round-trip, size accounting, validation, averaging."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.payloads import PAYLOADS, Logits, PayloadError
from fedkd.registry import UnknownNameError
from fedkd.wire import payload_to_record, record_to_payload


def make_logits(n: int = 6, c: int = 10, seed: int = 0, idx=None) -> Logits:
    rng = np.random.default_rng(seed)
    if idx is None:
        idx = np.sort(rng.choice(1000, size=n, replace=False)).astype(np.int64)
    return Logits(np.asarray(idx), rng.normal(size=(len(idx), c)).astype(np.float32))


# --- wire format ---------------------------------------------------------------------


def test_logits_wire_round_trip_is_exact():
    p = make_logits()
    record = payload_to_record(p)
    assert sorted(record.keys()) == ["idx", "values"]
    back = record_to_payload("logits", record)
    assert isinstance(back, Logits)
    for name in ("idx", "values"):
        a, b = getattr(p, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name  # bit-exact, NaN-safe


def test_wire_round_trip_of_non_contiguous_arrays():
    base = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    p = Logits(np.arange(0, 20, 2, dtype=np.int64)[::-1], np.asfortranarray(base))
    assert not p.values.flags.c_contiguous and not p.idx.flags.c_contiguous
    back = record_to_payload("logits", payload_to_record(p))
    np.testing.assert_array_equal(back.values, base)
    np.testing.assert_array_equal(back.idx, np.arange(18, -1, -2))


@pytest.mark.parametrize(
    ("idx_dtype", "val_dtype"), [(np.int32, np.float64), (np.int64, np.float16)]
)
def test_wire_keeps_dtypes(idx_dtype, val_dtype):
    p = Logits(
        np.arange(3, dtype=idx_dtype), np.linspace(-1, 1, 12).reshape(3, 4).astype(val_dtype)
    )
    back = record_to_payload("logits", payload_to_record(p))
    assert back.idx.dtype == idx_dtype and back.values.dtype == val_dtype
    np.testing.assert_array_equal(back.values, p.values)


def test_record_to_payload_unknown_kind():
    with pytest.raises(UnknownNameError, match="known: .*logits"):
        record_to_payload("logitz", payload_to_record(make_logits()))


def test_from_arrays_missing_array():
    with pytest.raises(PayloadError, match=r"lacks arrays \['values'\]"):
        Logits.from_arrays({"idx": np.arange(3)})


def test_logits_registered_as_payload_kind():
    assert PAYLOADS.get("logits") is Logits
    assert Logits.kind == "logits"


# --- size ----------------------------------------------------------------------------


def test_nbytes_counts_array_data():
    p = make_logits(n=7, c=10)
    # public indices are derived from (seed, round) on both sides: not counted
    assert Logits.derived == ("idx",)
    assert p.nbytes == p.values.nbytes == 7 * 10 * 4
    half = Logits(p.idx.astype(np.int32), p.values.astype(np.float16))
    assert half.nbytes == 7 * 10 * 2
    assert isinstance(p.nbytes, int)


def test_arrays_are_the_fields():
    p = make_logits()
    arrays = p.arrays()
    assert list(arrays) == ["idx", "values"]
    assert arrays["idx"] is p.idx and arrays["values"] is p.values


# --- validation ----------------------------------------------------------------------


def test_valid_logits_pass():
    make_logits(c=10).validate(num_classes=10)
    Logits(np.zeros(0, dtype=np.int64), np.zeros((0, 3), np.float32)).validate(num_classes=3)
    Logits(np.arange(2, dtype=np.uint16), np.zeros((2, 3), np.float64)).validate(num_classes=3)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (Logits(np.arange(4), np.zeros((4, 9), np.float32)), r"shape \(4, 9\), expected \(4, 10\)"),
        (Logits(np.arange(4), np.zeros((5, 10), np.float32)), r"expected \(4, 10\)"),
        (Logits(np.arange(4), np.zeros((4, 10, 1), np.float32)), "shape"),
        (Logits(np.arange(4), np.zeros(40, np.float32)), "shape"),
        (Logits(np.arange(4.0), np.zeros((4, 10), np.float32)), "1-D integer"),
        (Logits(np.arange(4).reshape(2, 2), np.zeros((4, 10), np.float32)), "1-D integer"),
        (Logits(np.arange(4), np.zeros((4, 10), np.int64)), "floating point"),
    ],
)
def test_validate_rejects_malformed(payload, message):
    with pytest.raises(PayloadError, match=message):
        payload.validate(num_classes=10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_rejects_non_finite(bad):
    values = np.zeros((4, 10), np.float32)
    values[2, 3] = bad
    values[0, 0] = bad
    with pytest.raises(PayloadError, match="2 non-finite values"):
        Logits(np.arange(4), values).validate(num_classes=10)


def test_validate_checks_num_classes():
    p = make_logits(c=10)
    p.validate(num_classes=10)
    for c in (9, 11):
        with pytest.raises(PayloadError, match="expected"):
            p.validate(num_classes=c)


def test_payload_error_is_a_value_error():
    assert issubclass(PayloadError, ValueError)


# --- averaging -----------------------------------------------------------------------


def test_mean_equals_numpy_mean():
    idx = np.array([3, 1, 4, 15, 9], dtype=np.int64)
    ps = [make_logits(idx=idx, seed=s) for s in range(3)]
    avg = Logits.mean(ps)
    np.testing.assert_array_equal(avg.idx, idx)
    assert avg.values.dtype == np.float32
    np.testing.assert_allclose(avg.values, np.mean([p.values for p in ps], axis=0), rtol=1e-6)


def test_weighted_mean_by_hand():
    idx = np.array([0, 1], dtype=np.int64)
    a = Logits(idx, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    b = Logits(idx, np.array([[5.0, 6.0], [7.0, 0.0]], np.float32))
    avg = Logits.mean([a, b], weights=[1, 3])
    # (1 * a + 3 * b) / 4
    expected = np.array([[4.0, 5.0], [6.0, 1.0]], np.float32)
    np.testing.assert_allclose(avg.values, expected, rtol=1e-7)
    # weights are relative: scaling them changes nothing; equal weights = plain mean
    np.testing.assert_array_equal(Logits.mean([a, b], weights=[10, 30]).values, avg.values)
    np.testing.assert_array_equal(
        Logits.mean([a, b], weights=[2.5, 2.5]).values, Logits.mean([a, b]).values
    )


def test_mean_of_one_payload_is_itself():
    p = make_logits()
    avg = Logits.mean([p])
    np.testing.assert_allclose(avg.values, p.values, rtol=0, atol=0)
    assert avg.idx is not p.idx  # a copy: changing the result cannot touch the input
    avg.idx[0] = -1
    assert p.idx[0] != -1


@pytest.mark.parametrize(
    "other_idx",
    [np.array([0, 1, 3]), np.array([1, 0, 2]), np.array([0, 1]), np.array([0, 1, 2, 3])],
)
def test_mean_rejects_mismatched_indices(other_idx):
    a = Logits(np.array([0, 1, 2]), np.zeros((3, 4), np.float32))
    b = Logits(other_idx, np.zeros((len(other_idx), 4), np.float32))
    with pytest.raises(PayloadError, match="different public indices"):
        Logits.mean([a, b])


def test_mean_of_nothing():
    with pytest.raises(ValueError, match="zero payloads"):
        Logits.mean([])
