"""Gaussian noise for DP mechanisms: seeded (reproducible) by default, or from the
operating system's CSPRNG (``privacy.secure_noise``).

Seeded noise makes a run repeatable, which is what a simulation needs to compare
settings; it is *not* a deployment-grade secret. Secure mode draws uniform bits
from ``os.urandom`` and turns them into normals by Box-Muller in float64 (it does
not defend against floating-point side channels, cf. Mironov 2012).
"""

from __future__ import annotations

import os

import numpy as np

from fedkd.seeding import derive_seed


class NoiseSource:
    """Draws ``N(0, std^2)`` arrays; each draw is keyed by (purpose, round, client)."""

    def __init__(self, seed: int, secure: bool = False) -> None:
        self.seed = seed
        self.secure = secure

    def normal(self, shape: tuple[int, ...], std: float, purpose: str, *keys: int) -> np.ndarray:
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        n = int(np.prod(shape))
        if self.secure:
            z = _secure_standard_normal(n)
        else:
            rng = np.random.default_rng(derive_seed(self.seed, f"dp-noise:{purpose}", *keys))
            z = rng.standard_normal(n)
        return (z * std).reshape(shape)


def _secure_standard_normal(n: int) -> np.ndarray:
    """``n`` standard normals from OS randomness (Box-Muller on 53-bit uniforms)."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(m, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(1 << 53)  # in (0, 1]
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    theta = 2.0 * np.pi * u[:, 1]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
