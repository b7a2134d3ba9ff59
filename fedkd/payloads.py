"""Typed payloads exchanged between server and clients.

A payload is a small frozen dataclass of NumPy arrays. It knows its size in bytes
(communication is counted from it), converts to and from plain arrays (the Flower
wire format lives in :mod:`fedkd.wire`), and validates itself on arrival.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from fedkd.registry import Registry


class PayloadError(ValueError):
    """A payload that is malformed (shape, dtype, non-finite values)."""


class Payload(ABC):
    """Base of every payload type; subclasses are dataclasses of NumPy arrays."""

    kind: ClassVar[str]

    def arrays(self) -> dict[str, np.ndarray]:
        """The payload's arrays by field name (what travels)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Payload:
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise PayloadError(f"{cls.kind} payload lacks arrays {missing}")
        return cls(**{n: arrays[n] for n in names})

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (array data; framing overhead not counted)."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @abstractmethod
    def validate(self, *, num_classes: int) -> None:
        """Raise :class:`PayloadError` if the payload cannot be used."""


PAYLOADS: Registry[type[Payload]] = Registry(
    "payload", check=lambda c: isinstance(c, type) and issubclass(c, Payload)
)


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.issubdtype(values.dtype, np.floating):
        raise PayloadError(f"{name} must be floating point, got {values.dtype}")
    if not np.isfinite(values).all():
        raise PayloadError(f"{name} has {int((~np.isfinite(values)).sum())} non-finite values")


@PAYLOADS.register("logits")
@dataclass(frozen=True)
class Logits(Payload):
    """Logits of public-set samples ``idx`` (one row per index, one column per class)."""

    idx: np.ndarray
    values: np.ndarray
    kind: ClassVar[str] = "logits"

    def validate(self, *, num_classes: int) -> None:
        if self.idx.ndim != 1 or not np.issubdtype(self.idx.dtype, np.integer):
            raise PayloadError(
                f"idx must be a 1-D integer array, got {self.idx.dtype}{self.idx.shape}"
            )
        if self.values.shape != (len(self.idx), num_classes):
            raise PayloadError(
                f"values have shape {self.values.shape}, expected ({len(self.idx)}, {num_classes})"
            )
        _check_finite("values", self.values)

    @staticmethod
    def mean(payloads: Sequence[Logits], weights: Sequence[float] | None = None) -> Logits:
        """(Weighted) mean over clients; all must cover the same public indices."""
        if not payloads:
            raise ValueError("cannot average zero payloads")
        idx = payloads[0].idx
        for p in payloads[1:]:
            if not np.array_equal(p.idx, idx):
                raise PayloadError("cannot average logits over different public indices")
        stacked = np.stack([p.values for p in payloads]).astype(np.float64)
        w = np.ones(len(payloads)) if weights is None else np.asarray(weights, dtype=np.float64)
        values = np.tensordot(w / w.sum(), stacked, axes=1)
        return Logits(idx.copy(), values.astype(np.float32))
