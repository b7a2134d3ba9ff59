"""The federation's data: disjoint private / public / test splits and client partitions.

Built once from the config (dataset, sizes, partitioner, seed) and cached on disk
under a key hashed from exactly those fields (for official datasets, also the data
root and the size and modification time of every file read). Clients and server load the same
cached arrays by path, so the public proxy set is *identified* (by its spec) and
only indices and logits ever travel in messages.

Generated datasets (mnist1d, digits, synthetic, hf) are one pool, split seeded into
private / public / test. Official datasets (``data.dataset = "cifar10"`` etc., read by
:mod:`fedkd.data.readers` from ``data.root``) keep their official splits: the test
set is (a seeded subset of) the test split, private and public rows are disjoint
seeded draws from the training split, so no test sample ever reaches a client.
``data.public`` may instead be a proxy set of its own, read from an official split
(see :class:`fedkd.config.PublicSet`); its labels are kept only when it is labelled
and either shares the private label space or keeps its own (``label_space = "own"``),
else ``public_y`` is all -1. With its own label space, the federation's labels are the
union: the proxy set's ``P`` classes are labels ``0..P-1``, the private (and test)
labels ``0..K-1`` are shifted to ``P..P+K-1`` and ``num_classes`` is ``P + K``, so every
model has ``P + K`` outputs. The shift comes after partitioning: partitioners see the
private labels ``0..K-1``. An official dataset's ``classes`` reader option keeps a
subset of its classes (:mod:`fedkd.data.classes`), in its train and test splits. With
``data.normalize`` (the default), an official dataset's private, public and test
inputs are normalised with its published per-channel statistics
(:mod:`fedkd.data.transforms`), a proxy set of another dataset with the *private*
dataset's, so every model sees one input pipeline. ``data.download`` fetches missing
official files first (:mod:`fedkd.data.download`).

Where the dataset has writers (FEMNIST), ``private_groups`` holds each private row's
writer id and partitioners that declare a ``groups`` parameter (``writer``) get it.
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

from fedkd.config import Config, ConfigError, DataConfig, check_plugin_params
from fedkd.data.datasets import DATASETS, OFFICIAL_SHAPES, OfficialDataset
from fedkd.data.partition import PARTITIONERS
from fedkd.data.readers import (
    READERS,
    Selection,
    Split,
    expected_files,
    present_files,
    read_split,
    selection,
)
from fedkd.data.transforms import normalize
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
    private_groups: np.ndarray | None = None  # writer id of each private row (FEMNIST)
    # P: labels 0..P-1 are the proxy set's own classes (data.public.label_space = "own"),
    # the private and test labels are P..num_classes-1; 0 for one shared label space
    public_classes: int = 0

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
        groups = {} if self.private_groups is None else {"private_groups": self.private_groups}
        np.savez(
            tmp,
            **groups,
            private_x=self.private_x,
            private_y=self.private_y,
            part_rows=np.concatenate(self.parts),
            part_sizes=sizes,
            public_x=self.public_x,
            public_y=self.public_y,
            test_x=self.test_x,
            test_y=self.test_y,
            num_classes=np.int64(self.num_classes),
            public_classes=np.int64(self.public_classes),
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
                z["private_groups"] if "private_groups" in z.files else None,
                int(z["public_classes"]) if "public_classes" in z.files else 0,
            )


def cache_dir() -> Path:
    """``$FEDKD_CACHE_DIR``, else ``~/.cache/fedkd``."""
    return Path(os.environ.get("FEDKD_CACHE_DIR", Path.home() / ".cache" / "fedkd"))


def data_key(config: Config) -> str:
    """Hash of exactly the config fields that determine the data.

    Where official files are read, also the resolved root and each file's path, size
    and modification time (so replaced files make a new key). Generated datasets with
    an int ``data.public`` keep the key they always had.
    """
    d = config.data
    spec: dict[str, Any] = {
        "data": d.dataset.to_dict(),
        "sizes": [d.private, int(d.public), d.test],
        "partition": config.partition.to_dict(),
        "clients": config.clients.count,
        "seed": config.seed,
        "version": 1,
    }
    reads = official_reads(d)
    if d.public.is_proxy:
        spec["public"] = d.public.to_plain()
    if reads:
        root = Path(d.root).expanduser().resolve()
        spec["root"] = str(root)
        spec["files"] = {
            str(rel): _stat(root, rel, READERS[name].pattern) for name, _, rel in reads
        }
        spec["version"] = 2
        if d.official and d.normalize:  # (a key without it: the arrays as read)
            spec["normalize"] = "published per-channel mean/std, v1"
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


DATASET_RUNTIME = ("num_samples", "seed")
PARTITION_RUNTIME = ("labels", "num_clients", "seed", "groups")
OFFICIAL_RUNTIME = ("num_samples", "seed", "root", "split")


def official_reads(d: DataConfig) -> list[tuple[str, str, Path]]:
    """(dataset, split, file relative to ``data.root``) of every official file the data needs."""
    needs: list[tuple[str, str, dict[str, Any]]] = []
    if d.official:
        needs += [(d.dataset.name, s, d.dataset.params) for s in ("train", "test")]
    if d.public.dataset is not None:
        needs.append((d.public.dataset.name, d.public.split, d.public.dataset.params))
    out: list[tuple[str, str, Path]] = []
    for name, split, options in needs:
        out += [(name, split, rel) for rel in expected_files(name, split, **options)]
    return list(dict.fromkeys(out))


def _stat(root: Path, rel: Path, pattern: str | None = None) -> list[Any]:
    """[name, size, mtime_ns] of ``root / rel`` or of its gzipped twin.

    For a folder of shards (``pattern`` given), that of every matching file, by name.
    """
    if pattern is not None:
        folder = root / rel
        shards = sorted(folder.glob(pattern)) if folder.is_dir() else []
        return [_stat(folder, Path(p.name)) for p in shards if p.is_file()]
    for path in (root / rel, root / rel.with_name(rel.name + ".gz")):
        if path.is_file():
            st = path.stat()
            return [path.name, st.st_size, st.st_mtime_ns]
    return [None]


def _require_files(d: DataConfig, name: str, split: str, options: dict[str, Any]) -> None:
    """Raise the readers' ConfigError on ``data.root`` if a file of the split is missing
    (it names every file, the folder and where to get them). With ``data.download``,
    missing files are fetched first (:mod:`fedkd.data.download`). Otherwise only checks
    that the files exist (cheap); nothing is read."""
    root = Path(d.root).expanduser()
    if d.download and present_files(name, root, split, **options)[1]:
        from fedkd.data.download import download

        download(name, root, [split], **options)
    if present_files(name, root, split, **options)[1]:
        read_split(name, root, split, **options)  # raises before reading: a file is missing


def _public_options_error(err: ConfigError) -> ConfigError:
    """A reader's option error on ``data.dataset...`` re-addressed to ``data.public...``."""
    if err.field.startswith("data.dataset"):
        return ConfigError("data.public" + err.field[len("data.dataset") :], err.reason)
    return err


def _same_labels(d: DataConfig) -> bool:
    """The proxy set shares the private label space: same dataset, same label options."""
    p = d.public.dataset
    assert p is not None
    strip = lambda o: {k: v for k, v in o.items() if k not in ("upright", "invert")}  # noqa: E731
    return p.name == d.dataset.name and strip(p.params) == strip(d.dataset.params)


def _same_files(d: DataConfig) -> bool:
    """The proxy set is read from the rows of the private training split (same files,
    and options that keep the same rows), so its rows are indexed as the private ones."""
    return _shared_files(d) and _selection(d.public.dataset) == _selection(d.dataset)


def _disjoint_rows(a: Selection | None, b: Selection | None) -> bool:
    """Two readings of the same files keep disjoint rows: classes of one label space,
    none in both (a reading of every row, or of another label space, may share rows)."""
    return a is not None and b is not None and a.space == b.space and not a.labels & b.labels


def _shared_files(d: DataConfig) -> bool:
    """The proxy set is read from the files of the private training split."""
    p = d.public.dataset
    if p is None or not d.official or d.public.split != "train":
        return False
    mine = expected_files(d.dataset.name, "train", **d.dataset.params)
    return p.name == d.dataset.name and expected_files(p.name, "train", **p.params) == mine


def _selection(spec: Any) -> Selection | None:
    """The labels whose rows a reader's options keep (``classes``); None: every row."""
    return selection(spec.name, **spec.params)


def _check_official(config: Config) -> None:
    """Options and files of an official dataset (files exist; none is read)."""
    d = config.data
    for key in OFFICIAL_RUNTIME:
        if key in d.dataset.params:
            what = "data.root" if key == "root" else "its official splits"
            raise ConfigError(
                f"data.dataset.{key}", f"is set by fedkd for official datasets (from {what})"
            )
    expected_files(d.dataset.name, "train", **d.dataset.params)  # option errors name the field
    for split in ("train", "test"):
        _require_files(d, d.dataset.name, split, d.dataset.params)


def _check_proxy(config: Config) -> None:
    """The table form of ``data.public``: reader options, split, labels, shape and files."""
    d = config.data
    p = d.public.dataset
    assert p is not None
    for key in OFFICIAL_RUNTIME:
        if key in p.params:
            raise ConfigError(f"data.public.{key}", "is set by fedkd (use data.root, split)")
    try:
        expected_files(p.name, d.public.split, **p.params)
    except ConfigError as err:
        raise _public_options_error(err) from None
    if p.name == d.dataset.name and d.public.split == "test":
        raise ConfigError(
            "data.public.split",
            f"{p.name}'s test split is the test set; a proxy set of the private dataset must "
            "come from another split (e.g. train, disjoint from the private rows)",
        )
    if (
        _shared_files(d)
        and not _same_files(d)
        and not _disjoint_rows(_selection(d.dataset), _selection(p))
    ):
        raise ConfigError(
            "data.public",
            f"the proxy set {p} and the private data {d.dataset} are both read from "
            f"{p.name}'s train split with options that keep different but overlapping "
            "rows, so the proxy set could hold private samples; use the same options, "
            'options that keep disjoint classes (e.g. classes = "digits" and '
            '"letters", or two lists of classes without a class in common), or a proxy '
            "set from another dataset",
        )
    if d.public.labelled:
        if d.public.split == "unlabeled":
            raise ConfigError("data.public.labelled", f"{p.name} {d.public.split} has no labels")
        own = d.public.label_space == "own"
        if own and _same_labels(d):
            raise ConfigError(
                "data.public.label_space",
                f'"own", but the labels of {p} are those of the private data {d.dataset}; '
                'use label_space = "shared" (the default: one label space)',
            )
        if not own and not _same_labels(d):
            raise ConfigError(
                "data.public.labelled",
                f"labels of {p} are not in the private label space of {d.dataset}; set "
                'data.public.label_space = "own" (models then output its classes and the '
                "private ones: a union label space, as FedMD's) or data.public.labelled = "
                "false (public_y is then -1)",
            )
    if d.official and OFFICIAL_SHAPES[p.name] != OFFICIAL_SHAPES[d.dataset.name]:
        _shape_error(d, OFFICIAL_SHAPES[p.name], OFFICIAL_SHAPES[d.dataset.name])
    _require_files(d, p.name, d.public.split, p.params)


def _shape_error(d: DataConfig, public: tuple[int, ...], private: tuple[int, ...]) -> None:
    assert d.public.dataset is not None
    raise ConfigError(
        "data.public.dataset",
        f"{d.public.dataset.name} inputs have shape {public} but the private data's "
        f"({d.dataset.name}) have shape {private}; the proxy set must match the private inputs",
    )


def check_data_config(config: Config) -> None:
    """Check the data plug-ins and sizes, cheaply, before anything is generated.

    For an official dataset or a proxy set, also that every file exists (none is read).
    Names and types of plug-in parameters, the dataset's ``max_samples`` and both
    plug-ins' ``precheck`` hooks (see :mod:`fedkd.data.datasets`, :mod:`fedkd.data.partition`).
    """
    d = config.data
    dataset = DATASETS.get(d.dataset.name)
    if isinstance(dataset, OfficialDataset):
        _check_official(config)
    else:
        check_plugin_params(dataset, d.dataset.params, "data.dataset", DATASET_RUNTIME)
        bind_params(dataset, d.dataset.params, "data.dataset", DATASET_RUNTIME)
        full = {**_defaults(dataset, DATASET_RUNTIME), **d.dataset.params}
        _check_dataset_size(config, dataset, full)
        precheck = getattr(dataset, "precheck", None)
        if callable(precheck):
            precheck(**full)
    if d.public.is_proxy:
        _check_proxy(config)
    partitioner = PARTITIONERS.get(config.partition.name)
    params = config.partition.params
    check_plugin_params(partitioner, params, "partition", PARTITION_RUNTIME)
    bind_params(partitioner, params, "partition", PARTITION_RUNTIME)
    if _groups_param(partitioner) == "required" and not _has_groups(d):
        raise ConfigError(
            "partition",
            f"{config.partition.name!r} splits the private set by writer, but "
            f"{d.dataset.name!r} has no writer ids; datasets with writers: "
            f"{', '.join(n for n, r in READERS.items() if r.groups)} "
            "(use e.g. partition=iid or partition=dirichlet for others)",
        )
    precheck = getattr(partitioner, "precheck", None)
    if callable(precheck):
        full = {**_defaults(partitioner, PARTITION_RUNTIME), **params}
        precheck(d.private, config.clients.count, **full)


def _has_groups(d: DataConfig) -> bool:
    """The private samples carry writer ids (an official dataset whose reader has them)."""
    return d.official and READERS[d.dataset.name].groups


def _groups_param(fn: Any) -> str | None:
    """How a partitioner takes writer ids: "required", "optional" or None (not at all)."""
    try:
        param = inspect.signature(fn).parameters.get("groups")
    except (TypeError, ValueError):
        return None
    if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        return None
    return "required" if param.default is param.empty else "optional"


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
    total = d.private + _pool_public(d) + d.test
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
    public, test = _pool_public(d), d.test
    if public + test > limit // 2:  # scale by limit / total, rounded down to a round number
        total = d.private + public + d.test
        step = 100 if limit >= 1000 else 10 if limit >= 100 else 1
        public, test = (max(v * limit // total // step * step, min(v, 1)) for v in (public, test))
    return f"data.private={limit - public - test} data.public={public} data.test={test}"


def _pool_public(d: DataConfig) -> int:
    """Public samples taken from the private dataset's pool: 0 for a proxy set of its own."""
    return 0 if d.public.is_proxy else int(d.public)


def build_federated_data(config: Config) -> FederatedData:
    """Build the splits (see the module doc) and partition the private split."""
    check_data_config(config)
    if config.data.official:
        return _build_official(config)
    d = config.data
    public = _pool_public(d)
    total = d.private + public + d.test
    make = DATASETS.get(d.dataset.name)
    pool = make(total, derive_seed(config.seed, "dataset"), **d.dataset.params)
    if len(pool.y) < total:
        raise ConfigError(
            "data",
            f"private+public+test = {total} but dataset {d.dataset.name!r} "
            f"has {len(pool.y)} samples; e.g. {_fitting_sizes(config, len(pool.y))}",
        )
    order = np.random.default_rng(derive_seed(config.seed, "split")).permutation(len(pool.y))
    priv, pub, test = np.split(order[:total], [d.private, d.private + public])
    public_x, public_y, public_classes = pool.x[pub], pool.y[pub], 0
    if d.public.is_proxy:
        public_x, public_y, public_classes = _read_proxy(config, pool.input_shape)
    return _federate(
        config,
        pool.x[priv],
        pool.y[priv],
        public_x,
        public_y,
        pool.x[test],
        pool.y[test],
        pool.num_classes,
        public_classes=public_classes,
    )


def _build_official(config: Config) -> FederatedData:
    """Official splits: test from ``test``, private and public disjoint draws from ``train``."""
    d = config.data
    name, options = d.dataset.name, d.dataset.params
    train = read_split(name, d.root, "train", **options)
    test = read_split(name, d.root, "test", **options)
    assert train.y is not None and test.y is not None
    same = _same_files(d)
    public = d.public.size if same or not d.public.is_proxy else 0
    need = d.private + public
    if need > len(train.y):
        what = "a proxy set from the same split" if same else "data.public"
        raise ConfigError(
            "data",
            f"data.private + {what} = {d.private} + {public} = {need}, but the {name} train "
            f"split in {train.source} has {len(train.y)} samples (the test set comes from "
            f"the test split); e.g. data.private={max(len(train.y) - public, 1)}",
        )
    order = np.random.default_rng(derive_seed(config.seed, "split")).permutation(len(train.y))
    priv, pub = order[: d.private], order[d.private : need]
    if d.test == 0 or d.test >= len(test.y):
        test_rows = np.arange(len(test.y))
    else:
        rng = np.random.default_rng(derive_seed(config.seed, "test"))
        test_rows = np.sort(rng.choice(len(test.y), size=d.test, replace=False))
    public_x, public_y, public_classes = train.x[pub], train.y[pub], 0
    if d.public.is_proxy:
        public_x, public_y, public_classes = _read_proxy(
            config, train.x.shape[1:], train if same else None, pub if same else None
        )
    return _federate(
        config,
        train.x[priv],
        train.y[priv],
        public_x,
        public_y,
        test.x[test_rows],
        test.y[test_rows],
        train.num_classes,
        None if train.groups is None else train.groups[priv],
        public_classes,
    )


def _read_proxy(
    config: Config,
    private_shape: tuple[int, ...],
    train: Split | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The proxy set's inputs, labels and, with its own label space, its class count P
    (else 0). Labels are -1 unless it is labelled, in the private label space or its own.

    ``train`` and ``rows`` are given when the proxy set shares the private training
    split's rows: ``rows`` are then its rows there, disjoint from the private ones (read
    again when options such as ``upright`` or ``invert`` change how they look).
    """
    d = config.data
    p = d.public.dataset
    assert p is not None
    if train is not None and rows is not None and p.params == d.dataset.params:
        x, y, classes = train.x[rows], train.y, train.num_classes
        y = None if y is None else y[rows]
    else:
        try:
            split = read_split(p.name, d.root, d.public.split, **p.params)
        except ConfigError as err:
            raise _public_options_error(err) from None
        if rows is None:
            if d.public.size > len(split.x):
                raise ConfigError(
                    "data.public.size",
                    f"{d.public.size} samples, but {p.name} {d.public.split} in {split.source} "
                    f"has {len(split.x)}",
                )
            rng = np.random.default_rng(derive_seed(config.seed, "public"))
            rows = np.sort(rng.choice(len(split.x), size=d.public.size, replace=False))
        x, y = split.x[rows], None if split.y is None else split.y[rows]
        classes = split.num_classes
    if tuple(x.shape[1:]) != tuple(private_shape):
        _shape_error(d, tuple(x.shape[1:]), tuple(private_shape))
    own = d.public.labelled and d.public.label_space == "own"
    if not (d.public.labelled and (own or _same_labels(d))) or y is None:
        y = np.full(len(x), -1, dtype=np.int64)
    return x, y, classes if own else 0


def _federate(
    config: Config,
    private_x: np.ndarray,
    private_y: np.ndarray,
    public_x: np.ndarray,
    public_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    private_groups: np.ndarray | None = None,
    public_classes: int = 0,
) -> FederatedData:
    """Partition the private split over the clients and assemble the splits.

    ``private_groups`` (writer ids) goes to partitioners that declare ``groups``. With
    ``public_classes`` P > 0 (the proxy set's own label space), the private and test
    labels are shifted by P after partitioning (partitioners see labels 0..K-1) and the
    federation has P + K classes.
    """
    d = config.data
    parts = _partition(config, private_y, private_groups)
    if d.official and d.normalize:  # one input pipeline: the proxy set too, with these stats
        private_x, public_x, test_x = (
            normalize(a, d.dataset.name) for a in (private_x, public_x, test_x)
        )
    if public_classes:  # the union label space: public 0..P-1, private P..P+K-1
        private_y, test_y = private_y + public_classes, test_y + public_classes
    return FederatedData(
        private_x,
        private_y,
        parts,
        public_x,
        public_y,
        test_x,
        test_y,
        num_classes + public_classes,
        private_groups,
        public_classes,
    )


def _partition(
    config: Config, private_y: np.ndarray, private_groups: np.ndarray | None
) -> list[np.ndarray]:
    """The configured partitioner's (checked) client rows of the private split."""
    d = config.data
    partition = PARTITIONERS.get(config.partition.name)
    runtime: dict[str, Any] = {}
    wants = _groups_param(partition)
    if wants == "required" and private_groups is None:
        raise ConfigError(
            "partition", f"{config.partition.name!r} needs writer ids; this data has none"
        )
    if wants is not None:
        runtime["groups"] = private_groups
    parts = partition(
        private_y,
        config.clients.count,
        derive_seed(config.seed, "partition"),
        **runtime,
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
    return parts


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
