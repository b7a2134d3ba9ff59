"""Conversion between typed payloads and Flower records (the only place that knows both)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedkd.payloads import PAYLOADS, Payload


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.asarray(order="C"), not ascontiguousarray: 0-d buffers must stay 0-d
    return ArrayRecord({name: Array(np.asarray(a, order="C")) for name, a in arrays.items()})


def payload_to_record(payload: Payload) -> ArrayRecord:
    return arrays_to_record(payload.arrays())


def record_to_payload(kind: str, record: ArrayRecord) -> Payload:
    """Rebuild a payload of registered ``kind`` (validation is the receiver's job)."""
    cls = PAYLOADS.get(kind)
    return cls.from_arrays({name: arr.numpy() for name, arr in record.items()})
