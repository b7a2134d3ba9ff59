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
    #: fields not counted in ``nbytes``: public indices, which both sides derive from
    #: the run seed and the round (they travel in the simulation only for validation)
    derived: ClassVar[tuple[str, ...]] = ()

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
        """Bytes a deployment would send: array data, minus ``derived`` fields
        (framing overhead not counted)."""
        return int(sum(a.nbytes for k, a in self.arrays().items() if k not in self.derived))

    @abstractmethod
    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        """Raise :class:`PayloadError` if the payload cannot be used.

        ``public_idx``: the public samples the receiver asked about, if it asked;
        payloads that cover public samples must cover exactly these.
        """


PAYLOADS: Registry[type[Payload]] = Registry(
    "payload",  # a payload class must name its ``kind`` (what the wire calls it)
    check=lambda c: isinstance(c, type) and issubclass(c, Payload) and bool(getattr(c, "kind", "")),
    group="fedkd.payloads",
)


def _check_idx(idx: np.ndarray, public_idx: np.ndarray | None) -> None:
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise PayloadError(f"idx must be a 1-D integer array, got {idx.dtype}{idx.shape}")
    if public_idx is not None and not np.array_equal(idx, public_idx):
        raise PayloadError("covers other public indices than requested")


def check_finite(name: str, values: np.ndarray) -> None:
    """Refuse a payload array that is not floating point or holds NaN/inf (PayloadError
    naming ``name``): for the ``validate`` of a payload type of your own."""
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
    derived: ClassVar[tuple[str, ...]] = ("idx",)

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        _check_idx(self.idx, public_idx)
        if self.values.shape != (len(self.idx), num_classes):
            raise PayloadError(
                f"values have shape {self.values.shape}, expected ({len(self.idx)}, {num_classes})"
            )
        check_finite("values", self.values)

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


@PAYLOADS.register("embedded_logits")
@dataclass(frozen=True)
class EmbeddedLogits(Logits):
    """:class:`Logits` with the model's embedding of each sample (the input of its final
    linear layer, ``fedkd.models.features(...)["embedding"]``): what a teacher sends when
    the clients' losses read ``teacher.embedding`` (FitNets hints, RKD, CRD)."""

    embedding: np.ndarray
    kind: ClassVar[str] = "embedded_logits"

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        super().validate(num_classes=num_classes, public_idx=public_idx)
        if self.embedding.ndim != 2 or len(self.embedding) != len(self.idx):
            raise PayloadError(
                f"embedding has shape {self.embedding.shape}, expected ({len(self.idx)}, D)"
            )
        check_finite("embedding", self.embedding)


@PAYLOADS.register("prototypes")
@dataclass(frozen=True)
class Prototypes(Payload):
    """Per-class mean embeddings (row c: the mean embedding of samples labelled c), as in
    FedProto (Tan et al. 2022). ``counts[c]``: how many samples (from a client) or
    clients (from the server) row c averages; a row with count 0 carries nothing."""

    means: np.ndarray  # (classes, D)
    counts: np.ndarray  # (classes,)
    kind: ClassVar[str] = "prototypes"

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        if self.means.ndim != 2 or len(self.means) != num_classes:
            raise PayloadError(f"means have shape {self.means.shape}, expected ({num_classes}, D)")
        if self.counts.shape != (num_classes,):
            raise PayloadError(f"counts have shape {self.counts.shape}, expected ({num_classes},)")
        check_finite("means", self.means)
        check_finite("counts", self.counts.astype(np.float64))
        if (self.counts < 0).any():
            raise PayloadError("counts must be >= 0")


@PAYLOADS.register("soft_labels")
@dataclass(frozen=True)
class SoftLabels(Payload):
    """Class probabilities of public-set samples ``idx`` (rows sum to 1)."""

    idx: np.ndarray
    probs: np.ndarray
    kind: ClassVar[str] = "soft_labels"
    derived: ClassVar[tuple[str, ...]] = ("idx",)

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        _check_idx(self.idx, public_idx)
        if self.probs.shape != (len(self.idx), num_classes):
            raise PayloadError(
                f"probs have shape {self.probs.shape}, expected ({len(self.idx)}, {num_classes})"
            )
        check_finite("probs", self.probs)
        if len(self.probs) and (self.probs.min() < -1e-6 or self.probs.max() > 1 + 1e-6):
            raise PayloadError("probs must lie in [0, 1]")
        worst = float(np.abs(self.probs.sum(axis=1) - 1).max()) if len(self.probs) else 0.0
        if worst > 1e-3:
            raise PayloadError(f"probability rows must sum to 1 (off by up to {worst:.3g})")

    @staticmethod
    def mean(payloads: Sequence[SoftLabels], weights: Sequence[float] | None = None) -> SoftLabels:
        """(Weighted) mean over clients; all must cover the same public indices."""
        avg = Logits.mean([Logits(p.idx, p.probs) for p in payloads], weights)
        return SoftLabels(avg.idx, avg.values)


@PAYLOADS.register("class_logits")
@dataclass(frozen=True)
class ClassLogits(Payload):
    """Per-class mean logits (row c: mean logit vector of samples labelled c), as in
    federated distillation (FD). ``counts[c]``: how many outputs (from a client: its
    samples, or its training steps' sample visits when collected during training) or
    clients (from the server) row c averages; a row with count 0 carries no information."""

    means: np.ndarray
    counts: np.ndarray
    kind: ClassVar[str] = "class_logits"

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        c = num_classes
        if self.means.shape != (c, c):
            raise PayloadError(f"means have shape {self.means.shape}, expected ({c}, {c})")
        if self.counts.shape != (c,):
            raise PayloadError(f"counts have shape {self.counts.shape}, expected ({c},)")
        check_finite("means", self.means)
        check_finite("counts", self.counts.astype(np.float64))
        if (self.counts < 0).any():
            raise PayloadError("counts must be >= 0")


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes < 2**bits -> bit-packed uint8 (``bits`` bits per code)."""
    planes = (codes.reshape(-1, 1).astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1))


def _unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits).reshape(count, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1)


@PAYLOADS.register("quantized_soft_labels")
@dataclass(frozen=True)
class QuantizedSoftLabels(Payload):
    """Soft labels quantized to ``bits`` bits per probability and bit-packed (CFD).

    Sattler et al.'s constrained uniform quantizer: each row becomes the vector
    ``q`` on the grid ``{l / (2**bits - 1)}`` that sums to 1 and is closest to the
    row in L1 distance (largest-remainder rounding; ties to the lower class index).
    Every entry is rounded down or up, so the reconstruction error is below
    ``1 / (2**bits - 1)`` per entry; one bit gives the one-hot argmax.
    ``nbytes`` is the packed size: what a real link would carry.
    """

    idx: np.ndarray
    packed: np.ndarray  # uint8, ceil(rows * classes * bits / 8) bytes
    meta: np.ndarray  # int32 [bits, rows, classes]
    kind: ClassVar[str] = "quantized_soft_labels"
    derived: ClassVar[tuple[str, ...]] = ("idx",)

    @classmethod
    def quantize(cls, labels: SoftLabels, bits: int) -> QuantizedSoftLabels:
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        levels = (1 << bits) - 1
        p = np.clip(labels.probs.astype(np.float64), 0.0, None)
        total = p.sum(axis=1, keepdims=True)
        p = np.divide(p, total, out=np.full_like(p, 1 / max(p.shape[1], 1)), where=total > 0)
        scaled = p * levels
        codes = np.floor(scaled + 1e-9).astype(np.int64)
        short = levels - codes.sum(axis=1)  # units still to hand out, per row (< classes)
        order = np.argsort(-(scaled - codes), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(p.shape[1])[None, :], axis=1)
        codes += rank < short[:, None]
        rows, classes = labels.probs.shape
        idx = labels.idx.astype(np.int32)  # public sets stay far below 2**31 samples
        return cls(idx, _pack_codes(codes, bits), np.array([bits, rows, classes], np.int32))

    def dequantize(self) -> np.ndarray:
        """The reconstructed probabilities (rows need not sum to 1 exactly)."""
        bits, rows, classes = (int(v) for v in self.meta)
        codes = _unpack_codes(self.packed, bits, rows * classes)
        return (codes / ((1 << bits) - 1)).reshape(rows, classes).astype(np.float32)

    def soft_labels(self) -> SoftLabels:
        """Dequantized and renormalized (an all-zero row becomes uniform)."""
        p = self.dequantize().astype(np.float64)
        total = p.sum(axis=1, keepdims=True)
        uniform = np.full_like(p, 1.0 / max(p.shape[1], 1))
        p = np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)
        return SoftLabels(self.idx.astype(np.int64), p.astype(np.float32))

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        _check_idx(self.idx, public_idx)
        if self.meta.shape != (3,) or not np.issubdtype(self.meta.dtype, np.integer):
            raise PayloadError(f"meta must be 3 integers, got {self.meta.dtype}{self.meta.shape}")
        bits, rows, classes = (int(v) for v in self.meta)
        if not 1 <= bits <= 16:
            raise PayloadError(f"bits must be in 1..16, got {bits}")
        if (rows, classes) != (len(self.idx), num_classes):
            raise PayloadError(
                f"shape ({rows}, {classes}), expected ({len(self.idx)}, {num_classes})"
            )
        need = -(-rows * classes * bits // 8)
        if self.packed.dtype != np.uint8 or self.packed.shape != (need,):
            raise PayloadError(
                f"packed must be {need} uint8 bytes, got {self.packed.dtype}{self.packed.shape}"
            )


@PAYLOADS.register("weights")
@dataclass(frozen=True)
class Weights(Payload):
    """A model's state (parameters and buffers) by name: FedAvg-style payloads."""

    tensors: dict[str, np.ndarray]
    kind: ClassVar[str] = "weights"

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Weights:
        return cls(dict(arrays))

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        if not self.tensors:
            raise PayloadError("weights payload is empty")
        for name, a in self.tensors.items():
            if np.issubdtype(a.dtype, np.floating):
                check_finite(name, a)
            elif not np.issubdtype(a.dtype, np.integer):
                raise PayloadError(f"{name} has unsupported dtype {a.dtype}")

    def check_like(self, reference: Weights) -> None:
        """Same names, shapes and dtypes as ``reference`` (e.g. the global model)."""
        if list(self.tensors) != list(reference.tensors):
            missing = sorted(set(reference.tensors) - set(self.tensors))
            extra = sorted(set(self.tensors) - set(reference.tensors))
            raise PayloadError(f"tensor names differ: missing {missing}, unexpected {extra}")
        for name, a in self.tensors.items():
            ref = reference.tensors[name]
            if a.shape != ref.shape or a.dtype != ref.dtype:
                raise PayloadError(f"{name} is {a.dtype}{a.shape}, expected {ref.dtype}{ref.shape}")

    @staticmethod
    def mean(payloads: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
        """(Weighted) average of floating tensors; integer buffers (e.g. BatchNorm's
        ``num_batches_tracked``) take the first payload's value."""
        if not payloads:
            raise ValueError("cannot average zero payloads")
        for p in payloads[1:]:
            p.check_like(payloads[0])
        w = np.ones(len(payloads)) if weights is None else np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        out = {}
        for name, first in payloads[0].tensors.items():
            if np.issubdtype(first.dtype, np.floating):
                stacked = np.stack([p.tensors[name] for p in payloads]).astype(np.float64)
                out[name] = np.tensordot(w, stacked, axes=1).astype(first.dtype)
            else:
                out[name] = first.copy()
        return Weights(out)


@PAYLOADS.register("votes")
@dataclass(frozen=True)
class Votes(Payload):
    """Hard labels (one class id per public sample ``idx``), e.g. PATE's teacher votes."""

    idx: np.ndarray
    labels: np.ndarray  # int16
    kind: ClassVar[str] = "votes"
    derived: ClassVar[tuple[str, ...]] = ("idx",)

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        _check_idx(self.idx, public_idx)
        if self.labels.shape != self.idx.shape or not np.issubdtype(self.labels.dtype, np.integer):
            raise PayloadError(
                f"labels must be integers of shape {self.idx.shape}, "
                f"got {self.labels.dtype}{self.labels.shape}"
            )
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < num_classes:
            raise PayloadError(f"labels must lie in 0..{num_classes - 1}")
