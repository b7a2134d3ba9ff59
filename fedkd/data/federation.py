"""The federation's data: disjoint private / public / test splits and client partitions.

Built once from the config (dataset, sizes, partitioner, seed) and cached on disk
under a key hashed from exactly those fields. Clients and server load the same
cached arrays by path, so the public proxy set is *identified* (by its spec) and
only indices and logits ever travel in messages.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import Config, ConfigError, check_plugin_params
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


DATASET_RUNTIME = ("num_samples", "seed")
PARTITION_RUNTIME = ("labels", "num_clients", "seed")


def check_data_config(config: Config) -> None:
    """Check the data plug-ins and sizes, cheaply, before anything is generated.

    Names and types of plug-in parameters, the dataset's ``max_samples`` and both
    plug-ins' ``precheck`` hooks (see :mod:`fedkd.data.datasets`, :mod:`fedkd.data.partition`).
    """
    d = config.data
    dataset = DATASETS.get(d.dataset.name)
    check_plugin_params(dataset, d.dataset.params, "data.dataset", DATASET_RUNTIME)
    bind_params(dataset, d.dataset.params, "data.dataset", DATASET_RUNTIME)
    full = {**_defaults(dataset, DATASET_RUNTIME), **d.dataset.params}
    _check_dataset_size(config, dataset, full)
    precheck = getattr(dataset, "precheck", None)
    if callable(precheck):
        precheck(**full)
    partitioner = PARTITIONERS.get(config.partition.name)
    params = config.partition.params
    check_plugin_params(partitioner, params, "partition", PARTITION_RUNTIME)
    bind_params(partitioner, params, "partition", PARTITION_RUNTIME)
    precheck = getattr(partitioner, "precheck", None)
    if callable(precheck):
        full = {**_defaults(partitioner, PARTITION_RUNTIME), **params}
        precheck(d.private, config.clients.count, **full)


def _defaults(fn: Any, runtime: tuple[str, ...]) -> dict[str, Any]:
    """Keyword parameters of ``fn`` that have defaults, ``runtime`` ones excluded."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in runtime
        and p.default is not p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check_dataset_size(config: Config, dataset: Any, params: dict[str, Any]) -> None:
    """private + public + test must fit the dataset's ``max_samples``, where it has one."""
    d = config.data
    limit = getattr(dataset, "max_samples", None)
    if callable(limit):
        limit = limit(**params)
    total = d.private + d.public + d.test
    if limit is None or total <= limit:
        return
    raise ConfigError(
        "data",
        f"data.private + data.public + data.test = {d.private} + {d.public} + {d.test} = "
        f"{total}, but dataset {d.dataset.name!r} has {limit} samples; "
        f"e.g. {_fitting_sizes(config, limit)}",
    )


def _fitting_sizes(config: Config, limit: int) -> str:
    """Sizes within ``limit``: public and test shrink to round numbers, private takes the rest."""
    d = config.data
    public, test = d.public, d.test
    if public + test > limit // 2:  # scale by limit / total, rounded down to a round number
        total = d.private + d.public + d.test
        step = 100 if limit >= 1000 else 10 if limit >= 100 else 1
        public, test = (max(v * limit // total // step * step, min(v, 1)) for v in (public, test))
    return f"data.private={limit - public - test} data.public={public} data.test={test}"


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
            f"has {len(pool.y)} samples; e.g. {_fitting_sizes(config, len(pool.y))}",
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
    _check_parts(config, parts)
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


def _check_parts(config: Config, parts: list[np.ndarray]) -> None:
    """A partitioner's result: one row array per client, disjoint, in range, big enough.

    Every client needs a sample, and at least ``partition.min_size`` where the
    partitioner has that parameter.
    """
    name, count, private = config.partition.name, config.clients.count, config.data.private
    if len(parts) != count:
        raise ConfigError("partition", f"{name!r} made {len(parts)} partitions for {count} clients")
    rows = np.concatenate([np.asarray(p).ravel() for p in parts])
    if rows.size and (rows.min() < 0 or rows.max() >= private):
        raise ConfigError("partition", f"{name!r} returned rows outside 0..{private - 1}")
    if len(np.unique(rows)) != len(rows):
        raise ConfigError("partition", f"{name!r} gave some private row to two clients")
    defaults = _defaults(PARTITIONERS.get(name), PARTITION_RUNTIME)
    min_size = config.partition.params.get("min_size", defaults.get("min_size", 0))
    if not isinstance(min_size, int) or isinstance(min_size, bool):
        min_size = 0
    sizes = [len(p) for p in parts]
    need = max(min_size, 1)
    small = [cid for cid, size in enumerate(sizes) if size < need]
    if not small:
        return
    fixes = "fewer clients.count, a larger data.private or a milder partition (e.g. partition=iid)"
    if min_size >= 1:
        field_path = "partition.min_size"
        what = f"fewer than partition.min_size={min_size} private samples"
    else:
        field_path, what = "partition", "no private samples"
        if "min_size" in defaults or "min_size" in config.partition.params:
            fixes = f"partition.min_size >= 1, {fixes}"
    raise ConfigError(
        field_path,
        f"{name!r} left {len(small)} of {count} clients with {what} (client {small[0]} has "
        f"{sizes[small[0]]}); use {fixes}",
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
