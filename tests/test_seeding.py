"""fedkd.seeding: seeds are pure functions of their keys, and seed_torch draws what
torch.manual_seed draws on this machine's generators."""

from __future__ import annotations

import torch

from fedkd.seeding import derive_seed, seed_torch


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert derive_seed(0, "client", 1, 2) == derive_seed(0, "client", 1, 2)
    assert len({derive_seed(0, "client", 1), derive_seed(0, "client", 1, 0),
                derive_seed(1, "client", 1), derive_seed(0, "server", 1)}) == 4  # fmt: skip


def test_seed_torch_equals_torch_manual_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        expected = torch.rand(5), torch.randint(0, 10, (5,))
        seed_torch(1234)
        got = torch.rand(5), torch.randint(0, 10, (5,))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
