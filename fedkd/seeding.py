"""Reproducible seeds derived from (run seed, purpose, round, client id).

Every random draw in a run comes from a generator seeded here, never from worker
order, so results do not depend on how many Ray workers ran the clients.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 32-bit seed (fits every library's seeding) that is a pure function of its arguments."""
    entropy = [seed, zlib.crc32(purpose.encode()), len(keys), *keys]  # length: (1,) != (1, 0)
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_torch(seed: int) -> None:
    """Seed torch's global generators: the CPU one, and the accelerators' where this
    process has any. (``torch.manual_seed`` also queues a lazy CUDA seeding, recording a
    stack trace, ~0.7 ms a call even without a GPU: twice per client per round.)"""
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


def seed_client_round(seed: int, rnd: int, cid: int) -> None:
    """Seed torch's global generators for client ``cid``'s round ``rnd`` (what the runtime
    does before each client's round, and before each one a group trains one by one)."""
    seed_torch(derive_seed(seed, "client-global", rnd, cid))


def torch_generator(seed: int, purpose: str, *keys: int):  # -> torch.Generator
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, purpose, *keys))
    return gen
