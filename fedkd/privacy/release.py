"""Client-level Gaussian mechanism on shared payloads (clip to L2 norm C, add noise).

The protected quantity is one client's payload of a round (its logits or soft
labels on the public subset, or its per-class means), as a single vector:

* clip: ``p <- p * min(1, C / ||p||_2)``, so one client moves the sum by at most C;
* central (trusted server; neighbouring runs add or remove one client's
  contribution): the server adds ``N(0, (sigma C)^2)`` to the *sum* of the clipped
  payloads of the round's k sampled clients (a client whose payload is missing or
  rejected counts as a zero vector) and divides by k, i.e. noise std
  ``sigma C / k`` on the mean; the strategy aggregates that one noisy mean;
* local (untrusted server; neighbouring runs replace one client's data): two
  clipped payloads differ by up to 2C, so each client adds ``N(0, (2 sigma C)^2)``
  to its own clipped payload before upload, then projects soft labels back onto
  the simplex (post-processing).

Per-class payloads (FD) release their noisy means only: their counts (a label
histogram) are replaced by ones.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedkd.payloads import ClassLogits, Logits, Payload, SoftLabels
from fedkd.privacy.noise import NoiseSource

#: payload types the mechanism applies to, and the field it clips and noises
FIELDS: dict[type[Payload], str] = {Logits: "values", SoftLabels: "probs", ClassLogits: "means"}


def values_of(payload: Payload) -> np.ndarray:
    for cls, name in FIELDS.items():
        if type(payload) is cls:  # exactly: a subclass may carry arrays this would not noise
            return np.asarray(getattr(payload, name), dtype=np.float64)
    raise TypeError(
        f"client-level Gaussian DP applies to {', '.join(c.kind for c in FIELDS)} payloads, "
        f"not {payload.kind}"
    )


def with_values(payload: Payload, values: np.ndarray) -> Payload:
    name = next(n for cls, n in FIELDS.items() if type(payload) is cls)
    out = replace(payload, **{name: values.astype(np.float32)})
    if isinstance(out, ClassLogits):
        out = replace(out, counts=np.ones_like(out.counts))
    return out


def clip(payload: Payload, bound: float) -> tuple[Payload, float]:
    """The payload scaled to L2 norm at most ``bound``, and its norm before clipping."""
    v = values_of(payload)
    norm = float(np.linalg.norm(v))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return with_values(payload, v * scale), norm


def to_simplex(probs: np.ndarray) -> np.ndarray:
    """Clamp at 0 and renormalise each row (a row with no mass becomes uniform)."""
    p = np.clip(probs, 0.0, None)
    total = p.sum(axis=1, keepdims=True)
    uniform = np.full_like(p, 1.0 / max(p.shape[1], 1))
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)


def local_release(
    payload: Payload, bound: float, sigma: float, noise: NoiseSource, rnd: int, cid: int
) -> Payload:
    """What a client uploads under local DP: clipped, plus ``N(0, (2 sigma C)^2)``
    (sensitivity 2C: the client's data replaced by any other)."""
    clipped, _ = clip(payload, bound)
    v = values_of(clipped)
    noisy = v + noise.normal(v.shape, 2 * sigma * bound, "local", rnd, cid)
    if isinstance(payload, SoftLabels):
        noisy = to_simplex(noisy)
    return with_values(clipped, noisy)


def central_mean(
    payloads: dict[int, Payload],
    bound: float,
    sigma: float,
    noise: NoiseSource,
    rnd: int,
    sampled: int | None = None,
) -> Payload:
    """The server's release under central DP: the sum of the clipped payloads plus
    ``N(0, (sigma C)^2)``, divided by the number of ``sampled`` clients (default: the
    payloads'), so that a missing payload counts as zeros, not as a smaller mean."""
    clipped = [clip(p, bound)[0] for p in payloads.values()]
    total = sum(values_of(p) for p in clipped)
    total = total + noise.normal(total.shape, sigma * bound, "central", rnd)
    k = len(clipped) if sampled is None else sampled
    if k < len(clipped):
        raise ValueError(f"{len(clipped)} payloads but only {k} sampled clients")
    return with_values(clipped[0], total / k)
