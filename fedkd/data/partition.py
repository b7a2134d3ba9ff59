"""Label-skew partitioners over the private set, built on ``flwr-datasets``.

Each partitioner maps the private labels to one index array per client. We wrap
``flwr_datasets.partitioner`` classes (applied to a one-column ``datasets.Dataset``
of labels) rather than re-implementing them, then check every client got data.

A partitioner that declares a ``groups`` parameter also gets the writer id of every
private sample (an array, or None for datasets without writers; only FEMNIST has them):
``writer`` splits by it. Declared without a default, ``groups`` is required, and fedkd
rejects the partitioner for datasets without writers before generating any data.

A partitioner may carry a ``precheck(num_samples, num_clients, **params)`` attribute
(every parameter, defaults filled in): fedkd calls it before generating any data, and
it raises :class:`~fedkd.config.ConfigError` for settings that cannot work. A
``min_size`` parameter, where a partitioner has one, is checked on its result.
"""

from __future__ import annotations

import logging
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np

from fedkd.config import ConfigError
from fedkd.registry import Registry

PartitionFn = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[PartitionFn] = Registry(
    "partitioner", check=callable, group="fedkd.partitioners"
)

log = logging.getLogger("fedkd")

Assignment = Literal["first-deterministic", "random", "deterministic"]


@contextmanager
def _quiet() -> Iterator[None]:
    """flwr-datasets warns on every Dirichlet resample: log those at debug level instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.debug("flwr-datasets: %s", w.message)


def _split(partitioner: Any, labels: np.ndarray) -> list[np.ndarray]:
    import datasets

    with _quiet():
        partitioner.dataset = datasets.Dataset.from_dict(
            {"label": labels, "row": np.arange(len(labels))}
        )
        return [
            np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
            for i in range(partitioner.num_partitions)
        ]


def _refused(name: str, err: ValueError) -> ConfigError:
    """A flwr-datasets refusal that no precheck foresaw, as a config error."""
    return ConfigError("partition", f"the {name} partitioner cannot split the private set: {err}")


def _check_count(num_samples: int, num_clients: int) -> None:
    if not 1 <= num_clients <= num_samples:
        raise ConfigError(
            "clients.count",
            f"{num_clients} clients for {num_samples} private samples; "
            f"use 1 <= clients.count <= {num_samples}",
        )


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal-size random shards (the private set is already shuffled by the seed)."""
    from flwr_datasets.partitioner import IidPartitioner

    _check_count(len(labels), num_clients)
    try:
        return _split(IidPartitioner(num_partitions=num_clients), labels)
    except ValueError as err:
        raise _refused("iid", err) from None


iid.precheck = _check_count  # type: ignore[attr-defined]


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
    ``min_partition_size``, up to 11 draws). ``self_balancing`` (off, as in flwr-datasets)
    stops giving a class to clients that already hold more than the average. When no
    draw works, the error lists seeded settings that do.
    """
    _check_dirichlet(len(labels), num_clients, alpha, min_size, self_balancing)
    try:
        part = _dirichlet_partitioner(num_clients, seed, alpha, min_size, self_balancing)
        return _split(part, labels)
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise _refused("dirichlet", err) from None
    works = _dirichlet_alternatives(labels, num_clients, seed, alpha, min_size, self_balancing)
    fixes = (
        f"Any one of these works with this seed: {', '.join(works)}; a larger data.private "
        "helps too."
        if works
        else "Lower partition.min_size, raise partition.alpha, set "
        "partition.self_balancing=true, use fewer clients.count or a larger data.private."
    )
    raise ConfigError(
        "partition.min_size",
        f"the Dirichlet partition (alpha={alpha:g}, self_balancing="
        f"{str(self_balancing).lower()}) found no split of the {len(labels)} private samples "
        f"that gives each of the {num_clients} clients at least min_size={min_size} "
        f"in 11 seeded draws (an even split gives {len(labels) // num_clients} each). {fixes}",
    )


def _dirichlet_partitioner(
    num_clients: int, seed: int, alpha: float, min_size: int, self_balancing: bool
) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=self_balancing,
        seed=seed,
    )


def _dirichlet_alternatives(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float,
    min_size: int,
    self_balancing: bool,
) -> list[str]:
    """Single-setting changes that make this seeded Dirichlet partition succeed (a few tries)."""
    import datasets

    table = datasets.Dataset.from_dict({"label": labels})

    def works(**change: Any) -> bool:
        kw = {"num_clients": num_clients, "alpha": alpha, "min_size": min_size}
        kw = {**kw, "self_balancing": self_balancing, **change}
        part = _dirichlet_partitioner(seed=seed, **kw)
        part.dataset = table
        try:
            with _quiet():
                part.load_partition(0)  # draws every client's share (min_size >= 1), or raises
        except ValueError:
            return False
        return True

    out = []
    for m in sorted({min_size * 3 // 4, min_size // 2, min_size // 4, 1} - {0}, reverse=True):
        if m < min_size and works(min_size=m):
            out.append(f"partition.min_size={m}")
            break
    for factor in (2, 5, 10, 100):
        if works(alpha=alpha * factor):
            out.append(f"partition.alpha={alpha * factor:g}")
            break
    if not self_balancing and works(self_balancing=True):
        out.append("partition.self_balancing=true")
    for n in (num_clients * 3 // 4, num_clients // 2, num_clients // 4):
        if n >= 1 and n * min_size <= len(labels) and works(num_clients=n):
            out.append(f"clients.count={n}")
            break
    return out


def _check_dirichlet(
    num_samples: int,
    num_clients: int,
    alpha: float = 0.5,
    min_size: int = 10,
    self_balancing: bool = False,
) -> None:
    _check_count(num_samples, num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(
            "partition.alpha", f"must be > 0 and finite, got {alpha} (e.g. partition.alpha=0.5)"
        )
    if min_size < 0:
        raise ConfigError(
            "partition.min_size", f"must be >= 0, got {min_size} (e.g. partition.min_size=10)"
        )
    if min_size * num_clients > num_samples:
        raise ConfigError(
            "partition.min_size",
            f"{num_clients} clients x min_size={min_size} = {num_clients * min_size} exceeds "
            f"the {num_samples} private samples; that needs partition.min_size <= "
            f"{num_samples // num_clients}, clients.count <= {num_samples // max(min_size, 1)} "
            f"or data.private >= {num_clients * min_size} (and Dirichlet draws need slack: "
            "an uneven split rarely fits exactly)",
        )


dirichlet.precheck = _check_dirichlet  # type: ignore[attr-defined]


@PARTITIONERS.register("pathological")
def pathological(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    classes_per_client: int = 2,
    assignment: Assignment = "first-deterministic",
) -> list[np.ndarray]:
    """Each client holds samples of exactly ``classes_per_client`` classes.

    ``assignment`` is flwr-datasets' ``class_assignment_mode``: ``first-deterministic``
    (the FedAvg paper's; client i's first class is i mod C), ``random`` or
    ``deterministic``. Samples of a class that no client drew belong to no client
    (fedkd logs how many).
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    _check_pathological(len(labels), num_clients, classes_per_client, assignment)
    counts = np.unique(labels, return_counts=True)[1]
    num_classes = len(counts)
    if not 1 <= classes_per_client <= num_classes:
        raise ConfigError(
            "partition.classes_per_client",
            f"must be in 1..{num_classes} (the private set has {num_classes} classes), "
            f"got {classes_per_client}",
        )
    part = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode=assignment,
        seed=seed,
    )
    try:
        return _split(part, labels)
    except ValueError as err:
        if "is needed to be assigned to more partitions" not in str(err):
            raise _refused("pathological", err) from None
    fit = int(counts.min()) * num_classes // classes_per_client
    raise ConfigError(
        "clients.count",
        f"the pathological partition gives each of {num_clients} clients "
        f"{classes_per_client} classes, so some class would be split among more clients "
        f"than it has samples (the rarest class has {counts.min()} of the {len(labels)} "
        f"private samples). Use fewer clients (about {fit} or fewer), a smaller "
        "partition.classes_per_client, partition.assignment=deterministic, "
        "or a larger data.private.",
    )


def _check_pathological(
    num_samples: int,
    num_clients: int,
    classes_per_client: int = 2,
    assignment: str = "first-deterministic",
) -> None:
    _check_count(num_samples, num_clients)
    if classes_per_client < 1:
        raise ConfigError(
            "partition.classes_per_client",
            f"must be >= 1, got {classes_per_client} (e.g. partition.classes_per_client=2)",
        )
    modes = typing.get_args(Assignment)
    if assignment not in modes:
        raise ConfigError(
            "partition.assignment", f"must be one of {', '.join(modes)}; got {assignment!r}"
        )


pathological.precheck = _check_pathological  # type: ignore[attr-defined]


@PARTITIONERS.register("shard")
def shard(
    labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2
) -> list[np.ndarray]:
    """FedAvg-paper shards: sort by label, cut equal shards, deal ``shards_per_client`` each.

    Rows left over after cutting equal shards belong to no client (fedkd logs how many).
    """
    from flwr_datasets.partitioner import ShardPartitioner

    _check_shard(len(labels), num_clients, shards_per_client)
    part = ShardPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_shards_per_partition=shards_per_client,
        seed=seed,
    )
    try:
        return _split(part, labels)
    except ValueError as err:
        raise _refused("shard", err) from None


def _check_shard(num_samples: int, num_clients: int, shards_per_client: int = 2) -> None:
    _check_count(num_samples, num_clients)
    if shards_per_client < 1 or shards_per_client * num_clients > num_samples:
        raise ConfigError(
            "partition.shards_per_client",
            f"{shards_per_client} shards x {num_clients} clients does not fit {num_samples} "
            f"samples; use 1 <= partition.shards_per_client <= {num_samples // num_clients}",
        )


shard.precheck = _check_shard  # type: ignore[attr-defined]


#: datasets whose samples carry a writer id (``groups``)
WRITER_DATASETS = ("femnist",)


@PARTITIONERS.register("writer")
def writer(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    groups: np.ndarray | None,
    writers_per_client: int = 0,
) -> list[np.ndarray]:
    """LEAF's natural split: each client holds the private samples of whole writers.

    ``groups`` is every private sample's writer id (FEMNIST). The writers are shuffled
    with the seed and dealt out: with ``writers_per_client = 0`` (default) all of them,
    round-robin over the clients (client sizes then follow the writers'); with k > 0
    each client gets exactly k writers and the remaining writers' samples belong to no
    client. Also registered as ``natural``.
    """
    _check_writer(len(labels), num_clients, writers_per_client)
    if groups is None:
        raise ConfigError(
            "partition",
            "the writer partitioner splits the private set by writer, but this dataset has "
            f"no writer ids; datasets with writers: {', '.join(WRITER_DATASETS)} "
            "(use e.g. partition=iid or partition=dirichlet for others)",
        )
    groups = np.asarray(groups)
    if groups.shape != (len(labels),):
        raise ValueError(f"{groups.shape[0]} writer ids for {len(labels)} private samples")
    names, writer_of = np.unique(groups, return_inverse=True)
    need = num_clients * max(writers_per_client, 1)
    if len(names) < need:
        fits = len(names) // max(writers_per_client, 1)
        raise ConfigError(
            "partition",
            f"the private set's {len(labels)} samples come from {len(names)} writers, but "
            + (
                f"clients.count={num_clients} x partition.writers_per_client="
                f"{writers_per_client} needs {need}"
                if writers_per_client
                else f"clients.count={num_clients} needs one writer per client"
            )
            + f"; use clients.count <= {fits}"
            + (", fewer partition.writers_per_client" if writers_per_client else "")
            + " or a larger data.private",
        )
    dealt = np.random.default_rng(seed).permutation(len(names))
    client_of = np.full(len(names), -1, dtype=np.int64)
    if writers_per_client:
        client_of[dealt[:need]] = np.arange(need) // writers_per_client
    else:
        client_of[dealt] = np.arange(len(names)) % num_clients
    client = client_of[writer_of.reshape(-1)]
    rows = np.argsort(client, kind="stable")  # by client, each client's rows ascending
    counts = np.bincount(client[client >= 0], minlength=num_clients)
    start = int(np.count_nonzero(client < 0))
    return [part.astype(np.int64) for part in np.split(rows[start:], np.cumsum(counts)[:-1])]


def _check_writer(num_samples: int, num_clients: int, writers_per_client: int = 0) -> None:
    _check_count(num_samples, num_clients)
    if writers_per_client < 0:
        raise ConfigError(
            "partition.writers_per_client",
            f"must be >= 0 (0: deal all writers over the clients), got {writers_per_client}",
        )
    if writers_per_client * num_clients > num_samples:
        raise ConfigError(
            "partition.writers_per_client",
            f"{num_clients} clients x {writers_per_client} writers need at least "
            f"{num_clients * writers_per_client} private samples, data.private is {num_samples}",
        )


writer.precheck = _check_writer  # type: ignore[attr-defined]
PARTITIONERS.register("natural")(writer)
