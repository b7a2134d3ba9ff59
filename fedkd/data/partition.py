"""Label-skew partitioners over the private set, built on ``flwr-datasets``.

Each partitioner maps the private labels to one index array per client. We wrap
``flwr_datasets.partitioner`` classes (applied to a one-column ``datasets.Dataset``
of labels) rather than re-implementing them, then check every client got data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedkd.config import ConfigError
from fedkd.registry import Registry

PartitionFn = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[PartitionFn] = Registry("partitioner", check=callable)


def _split(partitioner: Any, labels: np.ndarray) -> list[np.ndarray]:
    import datasets

    partitioner.dataset = datasets.Dataset.from_dict(
        {"label": labels, "row": np.arange(len(labels))}
    )
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
        for i in range(partitioner.num_partitions)
    ]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal-size random shards (the private set is already shuffled by the seed)."""
    from flwr_datasets.partitioner import IidPartitioner

    return _split(IidPartitioner(num_partitions=num_clients), labels)


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Per-class client shares drawn from Dirichlet(alpha); smaller alpha, stronger skew.

    Resamples until every client holds at least ``min_size`` samples (flwr-datasets'
    ``min_partition_size``). ``self_balancing`` (off, as in flwr-datasets) stops giving
    a class to clients that already hold more than the average.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    if alpha <= 0:
        raise ConfigError("partition.alpha", f"must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ConfigError(
            "partition.min_size",
            f"{num_clients} clients x {min_size} exceeds the {len(labels)} private samples",
        )
    part = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=self_balancing,
        seed=seed,
    )
    return _split(part, labels)


@PARTITIONERS.register("pathological")
def pathological(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    classes_per_client: int = 2,
    assignment: str = "first-deterministic",
) -> list[np.ndarray]:
    """Each client holds samples of exactly ``classes_per_client`` classes.

    ``assignment`` is flwr-datasets' ``class_assignment_mode``: ``first-deterministic``
    (the FedAvg paper's; client i's first class is i mod C), ``random`` or
    ``deterministic``. Samples of a class that no client drew belong to no client
    (fedkd logs how many).
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    num_classes = len(np.unique(labels))
    if not 1 <= classes_per_client <= num_classes:
        raise ConfigError(
            "partition.classes_per_client", f"must be in 1..{num_classes}, got {classes_per_client}"
        )
    part = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode=assignment,
        seed=seed,
    )
    return _split(part, labels)


@PARTITIONERS.register("shard")
def shard(
    labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2
) -> list[np.ndarray]:
    """FedAvg-paper shards: sort by label, cut equal shards, deal ``shards_per_client`` each.

    Rows left over after cutting equal shards belong to no client (fedkd logs how many).
    """
    from flwr_datasets.partitioner import ShardPartitioner

    if shards_per_client < 1 or shards_per_client * num_clients > len(labels):
        raise ConfigError(
            "partition.shards_per_client",
            f"{shards_per_client} shards x {num_clients} clients "
            f"does not fit {len(labels)} samples",
        )
    part = ShardPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_shards_per_partition=shards_per_client,
        seed=seed,
    )
    return _split(part, labels)
