"""The federation's data: disjoint private / public / test splits and client partitions.

Built once from the config (dataset, sizes, partitioner, seed) and cached on disk
under a key hashed from exactly those fields. Clients and server load the same
cached arrays by path, so the public proxy set is *identified* (by its spec) and
only indices and logits ever travel in messages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.data.datasets import DATASETS
from fedkd.data.partition import PARTITIONERS
from fedkd.registry import bind_params
from fedkd.seeding import derive_seed

log = logging.getLogger("fedkd")


@dataclass(frozen=True)
class ClientData:
    """One client's view: its private samples plus the shared public inputs and test set."""

    x: np.ndarray
    y: np.ndarray
    public_x: np.ndarray
    public_y: np.ndarray  # only for algorithms that assume a labelled public set (FedMD)
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class FederatedData:
    """All splits of one run. ``parts[i]`` indexes client i's rows of the private set."""

    private_x: np.ndarray
    private_y: np.ndarray
    parts: list[np.ndarray]
    public_x: np.ndarray
    public_y: np.ndarray  # kept for analysis and labelled-public algorithms; KD ignores it
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.private_x.shape[1:])

    @property
    def part_sizes(self) -> dict[int, int]:
        """Private-set size of every client (what DP-SGD's sample rate depends on)."""
        return {cid: len(rows) for cid, rows in enumerate(self.parts)}

    def client(self, cid: int) -> ClientData:
        rows = self.parts[cid]
        return ClientData(
            self.private_x[rows],
            self.private_y[rows],
            self.public_x,
            self.public_y,
            self.test_x,
            self.test_y,
            self.num_classes,
        )

    def save(self, path: Path) -> None:
        """Write atomically (parallel runs may share a cache directory)."""
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            private_x=self.private_x,
            private_y=self.private_y,
            part_rows=np.concatenate(self.parts),
            part_sizes=sizes,
            public_x=self.public_x,
            public_y=self.public_y,
            test_x=self.test_x,
            test_y=self.test_y,
            num_classes=np.int64(self.num_classes),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FederatedData:
        with np.load(path) as z:
            bounds = np.cumsum(z["part_sizes"])[:-1]
            return cls(
                z["private_x"],
                z["private_y"],
                list(np.split(z["part_rows"], bounds)),
                z["public_x"],
                z["public_y"],
                z["test_x"],
                z["test_y"],
                int(z["num_classes"]),
            )


def cache_dir() -> Path:
    """``$FEDKD_CACHE_DIR``, else ``~/.cache/fedkd``."""
    return Path(os.environ.get("FEDKD_CACHE_DIR", Path.home() / ".cache" / "fedkd"))


def data_key(config: Config) -> str:
    """Hash of exactly the config fields that determine the data."""
    spec = {
        "data": config.data.dataset.to_dict(),
        "sizes": [config.data.private, config.data.public, config.data.test],
        "partition": config.partition.to_dict(),
        "clients": config.clients.count,
        "seed": config.seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def check_data_config(config: Config) -> None:
    """Name checks of the data plug-ins, cheap enough to run before anything else."""
    dataset = DATASETS.get(config.data.dataset.name)
    bind_params(dataset, config.data.dataset.params, "data.dataset", ("num_samples", "seed"))
    partitioner = PARTITIONERS.get(config.partition.name)
    bind_params(
        partitioner, config.partition.params, "partition", ("labels", "num_clients", "seed")
    )


def build_federated_data(config: Config) -> FederatedData:
    """Generate the pool, split it disjointly (seeded) and partition the private split."""
    check_data_config(config)
    d = config.data
    total = d.private + d.public + d.test
    make = DATASETS.get(d.dataset.name)
    pool = make(total, derive_seed(config.seed, "dataset"), **d.dataset.params)
    if len(pool.y) < total:
        raise ConfigError(
            "data",
            f"private+public+test = {total} but dataset {d.dataset.name!r} "
            f"has {len(pool.y)} samples",
        )
    order = np.random.default_rng(derive_seed(config.seed, "split")).permutation(len(pool.y))
    priv, pub, test = np.split(order[:total], [d.private, d.private + d.public])
    partition = PARTITIONERS.get(config.partition.name)
    parts = partition(
        pool.y[priv],
        config.clients.count,
        derive_seed(config.seed, "partition"),
        **config.partition.params,
    )
    if len(parts) != config.clients.count:
        raise ConfigError(
            "partition", f"made {len(parts)} partitions for {config.clients.count} clients"
        )
    for cid, rows in enumerate(parts):
        if len(rows) == 0:
            raise ConfigError("partition", f"client {cid} received no private samples")
    assigned = sum(len(rows) for rows in parts)
    if assigned < d.private:
        log.warning(
            "partition %s assigned %d of %d private samples; the other %d belong to no client",
            config.partition,
            assigned,
            d.private,
            d.private - assigned,
        )
    return FederatedData(
        pool.x[priv],
        pool.y[priv],
        parts,
        pool.x[pub],
        pool.y[pub],
        pool.x[test],
        pool.y[test],
        pool.num_classes,
    )


def prepare_federated_data(config: Config) -> tuple[FederatedData, Path]:
    """The run's data and the cache file that clients load it from (built if missing)."""
    path = (
        cache_dir()
        / "data"
        / f"{config.data.dataset.name.replace(':', '_')}-{data_key(config)}.npz"
    )
    if path.is_file():
        return load_federated_data(str(path)), path
    data = build_federated_data(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.save(path)
    return data, path


@functools.lru_cache(maxsize=4)
def load_federated_data(path: str) -> FederatedData:
    """Load (once per process) the arrays written by :func:`prepare_federated_data`."""
    return FederatedData.load(Path(path))
