"""Simulated faults: dropout, stragglers past a deadline, and Byzantine clients.

Everything here is a pure function of the config (``[faults]`` and the run seed), the
round and the client id, drawn through :func:`fedkd.seeding.derive_seed`, so the same
config gives the same faults whatever the worker order, and each round's faults can be
recorded (:class:`fedkd.results.records.FaultsRecord`) and replayed. Delays are
simulated, never slept.

* Dropout and stragglers: :func:`plan_round` draws each sampled client's fate from its
  own generator keyed by (seed, round, client), so a client's fate does not depend on
  which other clients were sampled.
* Byzantine clients (:func:`byzantine_clients`) are fixed for the whole run. They send
  :func:`attack_payload` instead of their honest payload, or, for the ``labelflip``
  attack, train on :func:`flip_labels` of their labels and send an honest payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from fedkd.config import ATTACKS, Config
from fedkd.payloads import (
    ClassLogits,
    Logits,
    Payload,
    QuantizedSoftLabels,
    SoftLabels,
    Votes,
    Weights,
)
from fedkd.results.records import FaultsRecord
from fedkd.seeding import derive_seed

#: the faults of one round: planned here, kept as they are in the round's record
RoundFaults = FaultsRecord

_TINY = 1e-12  # probabilities are clipped here before taking logs (log 0 = -inf)


def byzantine_clients(config: Config) -> tuple[int, ...]:
    """The run's Byzantine client ids, sorted: ``faults.byzantine_count(clients.count)``
    of them, the head of a seeded permutation (not the first ids, which would line up
    with the round-robin model assignment)."""
    n = config.clients.count
    k = min(config.faults.byzantine_count(n), n)
    if k <= 0:
        return ()
    rng = np.random.default_rng(derive_seed(config.seed, "byzantine"))
    return tuple(sorted(int(c) for c in rng.permutation(n)[:k]))


def plan_round(config: Config, rnd: int, cids: Sequence[int]) -> RoundFaults:
    """The faults of round ``rnd`` for the sampled clients ``cids``.

    Each client, independently and from its own generator keyed by (seed, round, client),
    drops out with probability ``faults.dropout``; otherwise it is a straggler with
    probability ``faults.stragglers``, late by an Exponential delay of mean
    ``faults.delay``. With ``faults.deadline > 0``, stragglers later than the deadline are
    ``late``. Every client draws the same three numbers whatever the configured rates, so
    e.g. raising ``dropout`` does not reshuffle the other clients' delays.
    """
    f = config.faults
    cids = sorted(int(c) for c in cids)
    bad = set(byzantine_clients(config))
    byzantine = tuple(c for c in cids if c in bad)
    if f.dropout == 0 and f.stragglers == 0:
        return RoundFaults(byzantine=byzantine)
    dropped: list[int] = []
    delays: dict[int, float] = {}
    for cid in cids:
        rng = np.random.default_rng(derive_seed(config.seed, "faults", rnd, cid))
        u_drop, u_late, e = rng.random(), rng.random(), rng.standard_exponential()
        if u_drop < f.dropout:
            dropped.append(cid)
        elif u_late < f.stragglers:
            delays[cid] = float(f.delay * e)
    late = tuple(c for c, d in delays.items() if f.deadline > 0 and d > f.deadline)
    return RoundFaults(tuple(dropped), delays, late, byzantine)


def attack_rng(config: Config, rnd: int, cid: int) -> np.random.Generator:
    """The generator of client ``cid``'s attack in round ``rnd`` (seed, "attack", round, cid)."""
    return np.random.default_rng(derive_seed(config.seed, "attack", rnd, cid))


def _std(values: np.ndarray) -> float:
    """The values' std, or 1 when it is zero or undefined (empty or one value)."""
    std = float(np.std(values)) if values.size else 0.0
    return std if np.isfinite(std) and std > 0 else 1.0


def _attack_array(
    values: np.ndarray, attack: str, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """A real-valued array (logits, means, weights) under ``attack``, same dtype and shape."""
    if attack == "random":
        out = rng.normal(0.0, _std(values), size=values.shape)
    elif attack == "signflip":
        out = -values
    elif attack == "scale":
        out = values.astype(np.float64) * scale
    else:  # labelflip
        out = values.copy()
    return np.asarray(out).astype(values.dtype, copy=False)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _attack_probs(
    probs: np.ndarray, attack: str, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Probability rows under ``attack``; every result is a valid probability row."""
    p = probs.astype(np.float64)
    rows, classes = p.shape
    if attack == "labelflip" or rows == 0 or classes == 0:
        return probs.copy()
    if attack == "random":
        out = rng.dirichlet(np.ones(classes), size=rows)
    else:
        log_p = np.log(np.clip(p, _TINY, None))
        out = _softmax(-log_p if attack == "signflip" else scale * log_p)
    return out.astype(probs.dtype)


def attack_payload(
    payload: Payload, attack: str, scale: float, num_classes: int, rng: np.random.Generator
) -> Payload:
    """What a Byzantine client sends instead of its honest ``payload``.

    A new payload of the same type (the input is never changed), with the same ``idx``,
    dtypes and shapes: only the values are malicious, so the payload passes shape checks.

    * :class:`Logits` (and :class:`ClassLogits`' ``means``; counts kept):
      ``random``: Gaussian, mean 0, the honest values' std (1 if that is 0);
      ``signflip``: ``-values``; ``scale``: ``values * scale``.
    * :class:`SoftLabels`: ``random``: rows drawn from Dirichlet(1);
      ``signflip``: ``softmax(-log p)``, mass moved to the least likely classes;
      ``scale``: ``softmax(scale * log p)``, sharpened for ``scale > 1``. All valid rows
      (``p`` is clipped at 1e-12 first, so zero probabilities stay finite).
    * :class:`QuantizedSoftLabels`: its dequantized soft labels attacked as above, then
      re-quantized with the same number of bits.
    * :class:`Weights`: ``random``: Gaussian, mean 0, each tensor's std (1 if 0);
      ``signflip``: ``-w``; ``scale``: ``w * scale``. Integer buffers (e.g. BatchNorm's
      ``num_batches_tracked``) are copied unchanged.
    * :class:`Votes`: ``random``: uniform class ids; ``signflip``: ``num_classes - 1 -
      votes``; ``scale``: unchanged (votes have no magnitude).
    * ``labelflip`` returns an unchanged copy: that attack acts on training
      (:func:`flip_labels`), not on the payload.

    Raises:
        ValueError: an unknown attack, or a payload type with no attack defined.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    if isinstance(payload, Logits):
        return replace(
            payload,
            idx=payload.idx.copy(),
            values=_attack_array(payload.values, attack, scale, rng),
        )
    if isinstance(payload, SoftLabels):
        return replace(
            payload, idx=payload.idx.copy(), probs=_attack_probs(payload.probs, attack, scale, rng)
        )
    if isinstance(payload, ClassLogits):
        means = _attack_array(payload.means, attack, scale, rng)
        return replace(payload, means=means, counts=payload.counts.copy())
    if isinstance(payload, QuantizedSoftLabels):
        return _attack_quantized(payload, attack, scale, rng)
    if isinstance(payload, Weights):
        return _attack_weights(payload, attack, scale, rng)
    if isinstance(payload, Votes):
        return _attack_votes(payload, attack, num_classes, rng)
    raise ValueError(f"no Byzantine attack is defined for {payload.kind!r} payloads")


def _attack_quantized(
    payload: QuantizedSoftLabels, attack: str, scale: float, rng: np.random.Generator
) -> QuantizedSoftLabels:
    """Quantized soft labels under ``attack``: dequantized, attacked, re-quantized."""
    if attack == "labelflip":
        return replace(
            payload,
            idx=payload.idx.copy(),
            packed=payload.packed.copy(),
            meta=payload.meta.copy(),
        )
    labels = payload.soft_labels()
    probs = _attack_probs(labels.probs, attack, scale, rng)
    bits = int(payload.meta[0])
    out = QuantizedSoftLabels.quantize(SoftLabels(labels.idx, probs), bits)
    return replace(payload, idx=payload.idx.copy(), packed=out.packed, meta=payload.meta.copy())


def _attack_weights(
    payload: Weights, attack: str, scale: float, rng: np.random.Generator
) -> Weights:
    """Model weights under ``attack``: float tensors attacked, integer buffers copied."""
    tensors = {
        name: _attack_array(a, attack, scale, rng)
        if np.issubdtype(a.dtype, np.floating)
        else a.copy()
        for name, a in payload.tensors.items()
    }
    return replace(payload, tensors=tensors)


def _attack_votes(payload: Votes, attack: str, num_classes: int, rng: np.random.Generator) -> Votes:
    """Class votes under ``attack`` (``scale`` leaves them unchanged: no magnitude)."""
    labels = payload.labels
    if attack == "random":
        labels = rng.integers(0, num_classes, size=labels.shape).astype(labels.dtype)
    elif attack == "signflip":
        labels = (num_classes - 1 - labels.astype(np.int64)).astype(labels.dtype)
    else:
        labels = labels.copy()
    return replace(payload, idx=payload.idx.copy(), labels=labels)


def byzantine_payload(
    config: Config, rnd: int, cid: int, payload: Payload, num_classes: int
) -> Payload:
    """Client ``cid``'s malicious payload of round ``rnd`` under ``faults.attack`` and
    ``faults.scale``, drawn from :func:`attack_rng` (the caller checks that ``cid`` is
    Byzantine)."""
    f = config.faults
    return attack_payload(payload, f.attack, f.scale, num_classes, attack_rng(config, rnd, cid))


def flip_labels(y: torch.Tensor, num_classes: int, first: int = 0) -> torch.Tensor:
    """The label-flipping attack's training labels: within the label range
    ``[first, num_classes)``, ``first + num_classes - 1 - y`` (with one label space,
    ``num_classes - 1 - y``; with a union label space the private labels flip among the
    private classes and the public ones among the public classes). Negative labels
    (an unlabelled public set's -1) stay. A new tensor of ``y``'s dtype and device."""
    flipped = (first + num_classes - 1 - y).to(dtype=y.dtype)
    return torch.where(y < 0, y, flipped)
