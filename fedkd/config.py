"""Typed, validated experiment configuration: TOML files plus dotted overrides.

A config is a tree of frozen dataclasses. Plug-ins (dataset, partitioner, models,
strategy) are :class:`Spec` values: a registered name or import path plus the
plug-in's own parameters, written either as a string (``"mlp"``) or as a table
(``{name = "cnn1d", channels = 64}``). Every error names the offending field by
its dotted path, and is raised before any simulation starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import tomllib


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` is its dotted path."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field = field_path
        self.reason = message
        super().__init__(f"{field_path}: {message}" if field_path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` put in front of the field path."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


@dataclass(frozen=True)
class Spec:
    """A plug-in reference: registered name or ``"pkg.mod:Name"``, plus its parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, path: str = "") -> Spec:
        if isinstance(value, Spec):
            return value
        if isinstance(value, str):
            return cls(value, {})
        if isinstance(value, Mapping):
            if "name" not in value or not isinstance(value["name"], str):
                raise ConfigError(path, "a plug-in table needs a string 'name' key")
            params = {k: v for k, v in value.items() if k != "name"}
            return cls(value["name"], params)
        raise ConfigError(path, f"expected a name or a table with 'name', got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __str__(self) -> str:
        if not self.params:
            return self.name
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({inner})"


def _positive(path: str, value: float, *, strict: bool = True) -> None:
    bound = f"{'>' if strict else '>='} 0"
    if not math.isfinite(value):  # from_dict already says so; this is for direct construction
        raise ConfigError(path, f"must be a finite number {bound}, got {value!r}")
    if not (value > 0 if strict else value >= 0):
        raise ConfigError(path, f"must be {bound}, got {value!r}")


def _check_recipe_numbers(grad_clip: float, label_smoothing: float) -> None:
    _positive("grad_clip", grad_clip, strict=False)
    if not 0 <= label_smoothing < 1:
        raise ConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing!r}")


#: datasets read from their official files (fedkd.data.readers); ``data.test = 0`` means
#: the whole official test split for these
OFFICIAL_DATASETS = (
    "mnist",
    "fashion_mnist",
    "emnist",
    "femnist",
    "cifar10",
    "cifar100",
    "svhn",
    "stl10",
)

_PUBLIC_KEYS = ("dataset", "split", "size", "labelled", "label_space")

#: ``data.public.label_space``: the proxy set's labels are the private ones ("shared"),
#: or its own, before the private ones in a union label space ("own")
LABEL_SPACES = ("shared", "own")

#: the attribution baselines ``baseline`` may name, in the order they run (fedkd.baselines)
BASELINES = ("local", "transfer", "fedavg", "centralised")

#: ``data.augment`` settings (fedkd.data.transforms.augment_for)
AUGMENT_CHOICES = ("auto", "none", "crop", "flip", "crop+flip")


class PublicSet(int):
    """``data.public``: the public proxy set, an int that is its size.

    Written as an int (``data.public = 1000``), it is a slice of the private dataset's
    pool (of its official training split, for an official dataset), disjoint from the
    private rows. Written as a table (``{ dataset = "cifar100", split = "train",
    size = 5000, labelled = false }``, other keys being the dataset's reader options,
    e.g. ``labels = "coarse"`` or ``classes = [...]``), it is read from that official
    split: ``dataset`` is set, and its labels are kept only if ``labelled``. Being an
    int, code that only needs the size uses it as one.

    ``label_space`` says where a labelled proxy set's labels live: ``"shared"`` (the
    default) in the private label space (same dataset and label options; others are
    refused), ``"own"`` in a label space of their own, as FedMD's MNIST digits for
    private letters (``{ dataset = "mnist", size = 5000, labelled = true, label_space =
    "own" }``). With ``"own"`` the federation's labels are the union: the proxy set's
    ``P`` classes are labels ``0..P-1``, the private classes (train and test) are
    shifted to ``P..P+K-1``, and every model (students, teacher, baselines) has ``P + K``
    outputs. Partitioners still see the private labels ``0..K-1``. Accuracy is then the
    argmax over all ``P + K`` outputs on the private test set (a public class predicted
    counts as an error), as in FedMD's code.
    """

    dataset: Spec | None
    split: str
    labelled: bool
    label_space: str

    def __new__(
        cls,
        size: int,
        dataset: Spec | None = None,
        split: str = "train",
        labelled: bool = False,
        label_space: str = "shared",
    ) -> PublicSet:
        self = super().__new__(cls, size)
        object.__setattr__(self, "dataset", dataset)
        object.__setattr__(self, "split", split)
        object.__setattr__(self, "labelled", labelled)
        object.__setattr__(self, "label_space", label_space)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PublicSet is immutable (cannot set {name})")

    def __reduce__(self) -> tuple[Any, ...]:
        args = (int(self), self.dataset, self.split, self.labelled, self.label_space)
        return (PublicSet, args)

    @property
    def size(self) -> int:
        return int(self)

    @property
    def is_proxy(self) -> bool:
        """True for a proxy set of its own (the table form), False for a private slice."""
        return self.dataset is not None

    def _key(self) -> tuple[Any, ...]:
        spec = None if self.dataset is None else json_key(self.dataset.to_dict())
        return (int(self), spec, self.split, self.labelled, self.label_space)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PublicSet):
            return self._key() == other._key()
        return self.dataset is None and int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._key()) if self.is_proxy else int.__hash__(self)

    def __repr__(self) -> str:
        if not self.is_proxy:
            return int.__repr__(self)
        return f"PublicSet({self.to_plain()!r})"

    def __str__(self) -> str:
        if not self.is_proxy:
            return int.__repr__(self)
        assert self.dataset is not None
        return f"{int(self)} ({self.dataset} {self.split})"

    def to_plain(self) -> int | dict[str, Any]:
        """The config value: an int, or the table (``label_space`` only when not shared,
        so that tables written before it existed keep their form and data keys)."""
        if self.dataset is None:
            return int(self)
        own = {} if self.label_space == "shared" else {"label_space": self.label_space}
        return {
            "dataset": self.dataset.name,
            "split": self.split,
            "size": int(self),
            "labelled": self.labelled,
            **own,
            **self.dataset.params,
        }

    @classmethod
    def parse(cls, value: Any, path: str = "public") -> PublicSet:
        """An int (a slice of the private pool) or a proxy table, checked; errors name ``path``."""
        if isinstance(value, PublicSet):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            _positive(path, value, strict=False)
            return cls(value)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a size or a proxy-set table, got {value!r}")
        size = value.get("size", 1000)
        if not isinstance(size, int) or isinstance(size, bool):
            raise ConfigError(f"{path}.size", f"expected int, got {size!r}")
        if "dataset" not in value:
            extra = sorted(set(value) - {"size"})
            if extra:
                raise ConfigError(
                    f"{path}.dataset",
                    f"a proxy-set table needs a dataset (it has {', '.join(extra)}); "
                    f"valid keys: {', '.join(_PUBLIC_KEYS)} and the dataset's options",
                )
            return cls.parse(size, path)
        dataset = Spec.parse(value["dataset"], f"{path}.dataset")
        if dataset.name not in OFFICIAL_DATASETS:
            raise ConfigError(
                f"{path}.dataset",
                f"a proxy set is read from official files: one of "
                f"{', '.join(OFFICIAL_DATASETS)}; got {dataset.name!r}",
            )
        options = {k: v for k, v in value.items() if k not in _PUBLIC_KEYS}
        dataset = Spec(dataset.name, {**dataset.params, **options})
        split, labelled = value.get("split", "train"), value.get("labelled", False)
        if not isinstance(split, str):
            raise ConfigError(f"{path}.split", f"expected a split name, got {split!r}")
        if not isinstance(labelled, bool):
            raise ConfigError(f"{path}.labelled", f"expected true or false, got {labelled!r}")
        label_space = value.get("label_space", "shared")
        if label_space not in LABEL_SPACES:
            raise ConfigError(
                f"{path}.label_space",
                f"must be one of {', '.join(map(repr, LABEL_SPACES))}; got {label_space!r}",
            )
        if label_space == "own" and not labelled:
            raise ConfigError(
                f"{path}.label_space",
                '"own" is a label space for the proxy set\'s labels, but it is unlabelled; '
                "set labelled = true (or drop label_space)",
            )
        if size < 1:
            raise ConfigError(f"{path}.size", f"must be >= 1, got {size}")
        return cls(size, dataset, split, labelled, label_space)


def json_key(value: Any) -> str:
    """A canonical JSON text of plain data (for comparing and hashing specs)."""
    import json

    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how many samples go to each disjoint split.

    An official dataset (:data:`OFFICIAL_DATASETS`) is read from ``root`` in
    torchvision's layout: private and public rows come from its training split, the
    test set from its test split (all of it when ``test`` is 0 or at least its size).
    """

    # the dataset plug-in: a generated one (mnist1d, digits, synthetic, hf) or one read
    # from its official files (mnist, fashion_mnist, emnist, femnist, cifar10, cifar100,
    # svhn, stl10); `fedkd list` shows them with their parameters. Official ones take
    # `classes = [...]`: keep those classes only (train and test), relabelled 0..K-1 in
    # the order given; label indices, class names where known (digits, letters, CIFAR-10
    # names), or lists merging classes into one (e.g. { name = "cifar100", classes = [0,
    # 2, 20] }, { name = "femnist", classes = [["a", "A"], ["b", "B"]] })
    dataset: Spec = field(default_factory=lambda: Spec("mnist1d"))
    private: int = 3000  # private training samples, partitioned over the clients
    # public proxy set: inputs shared by identity, never shipped; a size or a table (its
    # dataset, split, size, labelled, label_space: see "The public proxy set" below)
    public: PublicSet = PublicSet(1000)
    test: int = 1000  # held-out global test set: every model is evaluated on it
    root: str = "data"  # folder holding official datasets' files (torchvision's layout)
    download: bool = False  # fetch missing official files into root (fedkd.data.download)
    # official datasets: subtract the published per-channel mean, divide by the std
    normalize: bool = True
    # train-time augmentation of private batches: auto (the dataset's usual recipe:
    # crop+flip for CIFAR/STL-10, crop for SVHN, none for the MNIST family and offline
    # data), none, crop, flip, crop+flip (fedkd.data.transforms)
    augment: str = "auto"

    def __post_init__(self) -> None:
        _positive("private", self.private)
        object.__setattr__(self, "public", PublicSet.parse(self.public, "public"))
        if self.test == 0 and not self.official:
            raise ConfigError(
                "test",
                "must be > 0, got 0 (0, the whole official test split, is for official "
                f"datasets only: {', '.join(OFFICIAL_DATASETS)})",
            )
        _positive("test", self.test, strict=False)
        if not isinstance(self.root, str) or not self.root:
            raise ConfigError("root", f"must be a folder path, got {self.root!r}")
        if self.augment not in AUGMENT_CHOICES:
            raise ConfigError(
                "augment", f"must be one of {', '.join(AUGMENT_CHOICES)}; got {self.augment!r}"
            )

    @property
    def official(self) -> bool:
        """True if the dataset is read from official files (it has official splits)."""
        return self.dataset.name in OFFICIAL_DATASETS


@dataclass(frozen=True)
class ClientsConfig:
    """The simulated clients: how many, their students, and how they train."""

    count: int = 10  # number of simulated clients
    # student architectures, assigned round-robin over the clients (`fedkd list` shows
    # every model with its parameter count)
    models: list[Spec] = field(default_factory=lambda: [Spec("mlp"), Spec("cnn1d")])
    # Explicit model per client id range ("0-4" or "7"); others go round-robin over `models`.
    model_groups: dict[str, Spec] = field(default_factory=dict)
    # Client strategy per client id range; others run the strategy's own client side.
    strategies: dict[str, Spec] = field(default_factory=dict)
    fraction: float = 1.0  # fraction of clients sampled each round
    batch_size: int = 32  # private batch size (also of the clients' public distillation)
    local_epochs: int = 3  # epochs over the private data per round
    # adam, adamw or sgd, with the optimizer's own settings, e.g. { name = "sgd",
    # momentum = 0.9, nesterov = true, weight_decay = 5e-4 } (see Training recipes)
    optimizer: Spec = field(default_factory=lambda: Spec("adam"))
    lr: float = 1e-2  # initial learning rate (a schedule scales it)
    # learning-rate schedule and its clock, e.g. { name = "cosine", clock = "round",
    # warmup = 5 } (see Training recipes)
    schedule: Spec = field(default_factory=lambda: Spec("constant"))
    grad_clip: float = 0.0  # max global gradient L2 norm per step; 0 = no clipping
    label_smoothing: float = 0.0  # on the cross-entropy term only
    # A round fails when fewer than this fraction of its sampled clients reply usably.
    min_success: float = 0.5

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError("count", f"must be >= 1, got {self.count}")
        if not self.models:
            raise ConfigError("models", "must name at least one model")
        if not 0 < self.fraction <= 1:
            raise ConfigError("fraction", f"must be in (0, 1], got {self.fraction}")
        _positive("batch_size", self.batch_size)
        _positive("local_epochs", self.local_epochs, strict=False)
        _positive("lr", self.lr)
        _check_recipe_numbers(self.grad_clip, self.label_smoothing)
        if not 0 < self.min_success <= 1:
            raise ConfigError("min_success", f"must be in (0, 1], got {self.min_success}")
        for section in ("model_groups", "strategies"):
            for key in getattr(self, section):
                parse_id_range(key, self.count, f"{section}.{key}")


@dataclass(frozen=True)
class ServerConfig:
    """The server's global teacher and how it is distilled on the public set."""

    teacher: Spec = field(default_factory=lambda: Spec("cnn1d", {"channels": 64}))  # model
    epochs: int = 2  # teacher distillation epochs on the public set per round
    batch_size: int = 64  # public batch size of the server's distillation
    optimizer: Spec = field(default_factory=lambda: Spec("adam"))  # as clients.optimizer
    lr: float = 3e-3  # initial learning rate of the teacher (a schedule scales it)
    schedule: Spec = field(default_factory=lambda: Spec("constant"))  # as clients.schedule
    grad_clip: float = 0.0  # (no label smoothing: the server only distills)
    public_subset: int = 0  # public samples used per round; 0 = all of them
    # How logit-type payloads (logits, soft labels) are combined: mean (the strategy's own
    # weighting), weighted_mean, median, trimmed_mean, clipped_mean (see fedkd.aggregators).
    aggregator: Spec = field(default_factory=lambda: Spec("mean"))

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, strict=False)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _positive("grad_clip", self.grad_clip, strict=False)
        _positive("public_subset", self.public_subset, strict=False)


@dataclass(frozen=True)
class SimulationConfig:
    """How Flower's simulation engine runs the clients."""

    backend: str = "ray"  # Flower's simulation backend (only ray)
    num_cpus: float = 1.0  # Ray CPUs reserved per client
    # Ray GPUs per client (a fraction shares a GPU); None = 0.2 where GPUs are present
    # (this machine, or the attached cluster) unless device = "cpu", else 0
    num_gpus: float | None = None
    threads: int = 1  # torch threads per client (one is fastest for small models)
    ray_init_args: dict[str, Any] = field(default_factory=dict)  # passed to ray.init
    # a running Ray cluster to attach to (see docs/ray_cluster.md): "auto" (the one
    # `ray start` started on this machine, or $RAY_ADDRESS) or its head's "host:port";
    # "" starts a private Ray for the run (ignoring $RAY_ADDRESS)
    ray_address: str = ""
    round_timeout: float = 600.0  # seconds to wait for replies before a round goes on
    verbose: bool = False  # show Flower's and Ray's own logs
    # clients one train message carries: a worker runs them in one task, without a task
    # (and its messages) per client; 0 = auto: 1, or, with vectorize, a round's clients
    # split evenly over the workers that run at once
    clients_per_message: int = 0
    # train a message's clients of the same strategy and params together where the
    # strategy can (ClientStrategy.train_group; kd: torch.func, clients of the same
    # architecture and private-set size); the rest one by one, with the reason logged
    vectorize: bool = False

    def __post_init__(self) -> None:
        if self.backend != "ray":
            raise ConfigError("backend", f"only 'ray' is supported, got {self.backend!r}")
        _positive("num_cpus", self.num_cpus)
        if self.num_gpus is not None:
            _positive("num_gpus", self.num_gpus, strict=False)
        _positive("threads", self.threads)
        _positive("round_timeout", self.round_timeout)
        _positive("clients_per_message", self.clients_per_message, strict=False)
        _check_ray_address("ray_address", self.ray_address)
        in_args = self.ray_init_args.get("address")
        if in_args is not None:
            _check_ray_address("ray_init_args.address", in_args)
            if self.ray_address and in_args != self.ray_address:
                raise ConfigError(
                    "ray_init_args.address",
                    f"{in_args!r} contradicts ray_address = {self.ray_address!r}; set only one",
                )
        if self.cluster_address:
            given = sorted(set(self.ray_init_args) & set(_LOCAL_ONLY_RAY_ARGS))
            if given:
                raise ConfigError(
                    f"ray_init_args.{given[0]}",
                    f"cannot be set when attaching to a running cluster ({self.cluster_address}):"
                    " its nodes declare their resources (ray start --num-cpus/--num-gpus); "
                    "per-client shares are simulation.num_cpus and simulation.num_gpus",
                )

    @property
    def cluster_address(self) -> str:
        """The Ray cluster the run attaches to (``ray_address``, or ``ray_init_args``'
        ``address``); "" for a private Ray started for the run."""
        return self.ray_address or str(self.ray_init_args.get("address") or "")


#: ray.init arguments Ray refuses when it connects to a running cluster
_LOCAL_ONLY_RAY_ARGS = (
    "num_cpus",
    "num_gpus",
    "resources",
    "labels",
    "object_store_memory",
    "_system_config",
    "_node_name",
    "_enable_object_reconstruction",
)


def _check_ray_address(path: str, value: Any) -> None:
    """``value`` is "", "auto" or "host:port" (a Ray cluster's head)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string (auto or host:port), got {value!r}")
    if value in ("", "auto"):
        return
    hint = 'give "auto" or the head node\'s host:port (e.g. "10.0.0.5:6379")'
    if value.startswith("ray://"):
        raise ConfigError(
            path,
            f"Ray Client addresses ({value!r}) are not supported: run fedkd on a node of the "
            f"cluster and {hint}",
        )
    if value == "local":
        raise ConfigError(path, f'"local" is spelled "" (a private Ray for the run); or {hint}')
    host, sep, port = value.rpartition(":")
    if not sep or not host or any(c.isspace() for c in host) or "/" in value:
        raise ConfigError(path, f"expected auto or host:port, got {value!r}; {hint}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"port must be a number in 1..65535, got {port!r} in {value!r}")


#: what Byzantine clients can do (see fedkd.faults.attack_payload)
ATTACKS = ("random", "signflip", "scale", "labelflip")


@dataclass(frozen=True)
class FaultsConfig:
    """Simulated faults, drawn from the run seed per (round, client) and recorded per round.

    Delays are simulated, not slept: a straggler's reply is late by a seeded delay, and
    replies later than ``deadline`` are dropped, so runs stay fast and reproducible.
    """

    dropout: float = 0.0  # probability that a sampled client does not reply in a round
    stragglers: float = 0.0  # probability that a sampled client is late in a round
    delay: float = 10.0  # mean extra delay (s) of a late client (exponentially distributed)
    deadline: float = 0.0  # replies later than this (simulated s) are dropped; 0 = no deadline
    byzantine: float = 0.0  # Byzantine clients: a count (>= 1) or a fraction of all (< 1)
    attack: str = "scale"  # random | signflip | scale | labelflip (what Byzantine clients do)
    scale: float = 100.0  # factor of the scale attack

    def __post_init__(self) -> None:
        for name in ("dropout", "stragglers"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(name, f"must be a probability in [0, 1), got {value!r}")
        _positive("delay", self.delay, strict=False)
        _positive("deadline", self.deadline, strict=False)
        _positive("byzantine", self.byzantine, strict=False)
        if self.byzantine >= 1 and self.byzantine != int(self.byzantine):
            raise ConfigError(
                "byzantine", f"a count must be whole, got {self.byzantine!r} (or a fraction < 1)"
            )
        if self.attack not in ATTACKS:
            raise ConfigError("attack", f"must be one of {', '.join(ATTACKS)}; got {self.attack!r}")

    def byzantine_count(self, clients: int) -> int:
        """How many of ``clients`` are Byzantine: a count, or a fraction rounded up (so a
        fraction > 0 always makes at least one)."""
        if self.byzantine >= 1:
            return int(self.byzantine)
        return math.ceil(self.byzantine * clients - 1e-9)


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for what clients share or train (see :mod:`fedkd.privacy`)."""

    # none | client_gaussian (client-level, on shared payloads) | dpsgd (record-level,
    # Opacus), or your own mechanism by import path ("my_lab.dp:LaplaceUpload")
    mechanism: str = "none"
    mode: str = "central"  # client_gaussian: central (server adds noise) | local (clients do)
    clip: float = 1.0  # client_gaussian: L2 bound C on each client's payload per round
    noise_multiplier: float = 1.0  # sigma: noise std / sensitivity (client_gaussian, dpsgd)
    max_grad_norm: float = 1.0  # dpsgd: per-sample gradient clipping bound
    delta: float = 1e-5  # epsilon is reported at this delta
    target_epsilon: float = 0.0  # budget: stop before exceeding it; 0 = no budget
    accountant: str = "rdp"  # rdp | prv (Opacus accountants)
    secure_noise: bool = False  # draw noise from the OS CSPRNG (not reproducible)
    audit: bool = True  # membership-inference audit of each student, every round
    # a plug-in mechanism's own parameters, checked against its Params dataclass (the
    # built-ins take none: they read the keys above, the short form)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedkd.privacy.mechanism import mechanism_class
        from fedkd.registry import UnknownNameError

        try:
            cls = mechanism_class(self.mechanism)
        except (UnknownNameError, TypeError) as err:
            raise ConfigError(
                "mechanism",
                f"must be none, client_gaussian, dpsgd or an import path "
                f"'package.module:Mechanism', got {self.mechanism!r} (PATE is the 'pate' "
                f"strategy): {err}",
            ) from None
        cls.parse_params(self)
        if self.mode not in ("central", "local"):
            raise ConfigError("mode", f"must be central or local, got {self.mode!r}")
        _positive("clip", self.clip)
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("max_grad_norm", self.max_grad_norm)
        if not 0 < self.delta < 1:
            raise ConfigError("delta", f"must be in (0, 1), got {self.delta!r}")
        _positive("target_epsilon", self.target_epsilon, strict=False)
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError("accountant", f"must be rdp or prv, got {self.accountant!r}")


@dataclass(frozen=True)
class Config:
    """One experiment. The defaults are the quick-start experiment."""

    name: str = "quickstart"  # names the run folder: <output_dir>/<name>-<time>
    seed: int = 0  # every random draw derives from it (splits, models, batches, noise)
    # run several seeds in one process and one Ray start, each in its own sub-folder,
    # with mean, std and 95% CI across them: a count (5: seeds 0..4) or a list ([3, 8]);
    # empty: one run with `seed`
    seeds: int | list[int] = field(default_factory=list)
    rounds: int = 10  # federated rounds
    output_dir: str = "runs"  # where run folders are created
    device: str = "auto"  # auto | cpu | cuda
    # mixed precision: training forward passes under bfloat16 autocast (no loss scaling
    # needed, so nothing to checkpoint); predictions, payloads and DP-SGD stay float32
    amp: bool = False
    # attribution baselines, run after the federation and reported beside it: true (=
    # ["local"]: every student on its private data alone), false, or a list of local,
    # transfer (public-set transfer learning, no collaboration), fedavg (homogeneous
    # students), centralised (all private data pooled: the upper bound)
    baseline: bool | list[str] = True
    # target accuracies (fractions, e.g. [0.3, 0.35]): the summary reports the first
    # round in which the students' mean reached each, and the bytes sent until then
    targets: list[float] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    # how the private set is split over the clients: iid, dirichlet, pathological,
    # shard, writer (FEMNIST's writers)
    partition: Spec = field(default_factory=lambda: Spec("dirichlet", {"alpha": 0.5}))
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # the federated algorithm and its parameters (kd, local, fedavg, fedmd, feddf, dsfl,
    # fd, cfd, cronus, pate, or your own by import path)
    strategy: Spec = field(
        default_factory=lambda: Spec(
            "kd", {"temperature": 3.0, "kd_weight": 0.5, "targets": "teacher", "weighted": False}
        )
    )
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(
                "rounds", f"must be >= 1 (the number of federated rounds), got {self.rounds}"
            )
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed} (e.g. seed=0)")
        for t in self.targets:
            if not 0 < t <= 1:
                raise ConfigError("targets", f"accuracies are fractions in (0, 1], got {t!r}")
        if isinstance(self.baseline, bool):
            object.__setattr__(self, "baseline", ["local"] if self.baseline else [])
        known = BASELINES
        unknown = [b for b in self.baseline if b not in known]
        if unknown or len(set(self.baseline)) != len(self.baseline):
            raise ConfigError(
                "baseline",
                f"must be true, false or a list of distinct {', '.join(known)}; "
                f"got {self.baseline!r}",
            )
        object.__setattr__(self, "baseline", [b for b in known if b in self.baseline])
        if isinstance(self.seeds, int):
            if self.seeds < 0:
                raise ConfigError("seeds", f"must be a count >= 0 or a list, got {self.seeds}")
            object.__setattr__(self, "seeds", list(range(self.seeds)))
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"must be distinct seeds >= 0, got {self.seeds}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"must be one of auto, cpu, cuda; got {self.device!r}")
        if self.clients.count > self.data.private:
            raise ConfigError(
                "clients.count",
                f"{self.clients.count} clients but only {self.data.private} private samples; "
                f"use clients.count <= {self.data.private} or data.private >= "
                f"{self.clients.count}",
            )
        if self.faults.byzantine_count(self.clients.count) > self.clients.count:
            raise ConfigError(
                "faults.byzantine",
                f"{self.faults.byzantine:g} Byzantine clients, {self.clients.count} in all",
            )
        if self.server.public_subset > self.data.public:
            raise ConfigError(
                "server.public_subset",
                f"{self.server.public_subset} exceeds the public set ({self.data.public})",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML-writable) that :func:`from_dict` turns back into this config."""
        return _to_plain(self)


def parse_id_range(key: str, count: int, path: str) -> range:
    """``"3"`` or ``"0-4"`` (inclusive) -> client ids, checked against ``count``."""
    lo, _, hi = key.partition("-")
    try:
        ids = range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ConfigError(path, f"client range {key!r} must look like '3' or '0-4'") from None
    if not ids or ids.start < 0 or ids.stop > count:
        raise ConfigError(path, f"client range {key!r} is outside 0-{count - 1}")
    return ids


def _to_plain(value: Any) -> Any:
    if isinstance(value, PublicSet):
        return value.to_plain()
    if isinstance(value, Spec):
        return {k: _to_plain(v) for k, v in value.to_dict().items()}
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is not None:  # TOML has no null: None fields fall back to their default
                out[f.name] = _to_plain(v)
        return out
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, path: str, default: Any = None) -> Any:
    """``value`` checked against ``hint`` (an int widens to float); ``default`` is for messages."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path, default)
        first: ConfigError | None = None
        for option in inner:  # e.g. float | Tensor (a torch optimizer's hints): any may take it
            try:
                return _coerce(value, option, path, default)
            except ConfigError as err:
                first = first or err
        assert first is not None
        raise first
    if hint is Spec:
        return Spec.parse(value, path)
    if hint is PublicSet:
        return PublicSet.parse(value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(path, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"must be one of {choices}; got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(path, f"expected a number, got {value!r}")
    if hint is float and (_non_finite(value) or isinstance(value, str) and _non_finite_text(value)):
        example = ""
        if isinstance(default, int | float) and math.isfinite(default):
            example = f" (the default is {default!r})"
        raise ConfigError(path, f"must be a finite number, got {value!r}{example}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(path, f"expected {hint.__name__}, got {value!r}")
    return value


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _non_finite_text(text: str) -> bool:
    """``"nan"``, ``"-inf"``, ``"1e999"``...: text that Python reads as a non-finite float."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


_RUNTIME_HINTS = {
    "seed": "set the run's seed instead (e.g. seed=1): fedkd derives the plug-in's from it",
    "num_samples": "set data.private, data.public and data.test instead",
    "num_clients": "set clients.count instead",
    "labels": "the partitioner gets the private labels from the dataset",
    "groups": "the partitioner gets the writer ids from the dataset (FEMNIST)",
    "input_shape": "the model gets it from the dataset",
    "num_classes": "the model gets it from the dataset",
}


def check_value(value: Any, hint: Any, path: str, default: Any = None) -> Any:
    """``value`` checked against type ``hint`` as config fields are (ints widen to float).

    Raises :class:`ConfigError` naming ``path`` for a wrong type, a non-finite float or a
    value outside a ``Literal``; ``default`` is quoted in the message where it helps.
    """
    return _coerce(value, hint, path, default)


def check_plugin_params(
    target: Any, params: Mapping[str, Any], path: str, runtime: tuple[str, ...] = ()
) -> None:
    """Check ``params`` against the type hints of ``target``'s keyword parameters.

    Complements :func:`fedkd.registry.bind_params` (which checks the names): a value of
    the wrong type, a non-finite float or a value outside a ``Literal`` raises a
    :class:`ConfigError` naming ``path.<param>``. Fedkd passes the ``runtime`` parameters
    itself, so setting one is an error too. Unannotated parameters are not checked.
    """
    for key in runtime:
        if key in params:
            hint = _RUNTIME_HINTS.get(key, "")
            raise ConfigError(
                f"{path}.{key}",
                f"is set by fedkd at run time and cannot be configured (got {params[key]!r})"
                + (f"; {hint}" if hint else ""),
            )
    try:
        sig = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except (TypeError, ValueError, NameError):  # builtins, unresolvable annotations
        return
    for key, value in params.items():
        param = sig.parameters.get(key)
        if param is not None and param.kind is not param.VAR_KEYWORD and key in hints:
            default = None if param.default is param.empty else param.default
            _coerce(value, hints[key], f"{path}.{key}", default)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, naming the field of any error."""
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            hint = ""
            if key == "params" and path and isinstance(value, Mapping) and value:
                inner = next(iter(value))  # `strategy.params.x=1` means `strategy.x=1`
                hint = f" (a plug-in's parameters sit directly under it: {path}.{inner}=...)"
            raise ConfigError(sub, f"unknown field; valid fields: {', '.join(fields)}{hint}")
        if hints[key] is Spec and isinstance(value, Mapping) and "name" not in value:
            # `partition.alpha=0.1` tunes the default plug-in instead of replacing it
            value = {**_default(fields[key]).to_dict(), **value}
        default = fields[key].default  # plain defaults only: they are the numbers
        kwargs[key] = _coerce(
            value, hints[key], sub, None if default is dataclasses.MISSING else default
        )
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (``3``, ``0.5``, ``true``, ``["a","b"]``), else a string.

    ``nan`` and ``inf`` stay strings: a string field (``name=nan``) takes them as they
    are, and a float field rejects them as not finite.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if _non_finite(value) else value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to plain config data (returns a new dict)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override must look like 'field.path=value'")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # a Spec written as a bare name becomes a table
                child = {"name": child}
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(
    source: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Load a config from a TOML file, a dict, or the defaults, then apply overrides."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif source is None:
        data = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("config", f"no such config file: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("config", f"{path} is not valid TOML: {err}") from None
    return from_dict(Config, apply_overrides(data, overrides))


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as TOML (what was run, defaults included)."""
    import tomli_w

    path.write_text(tomli_w.dumps(config.to_dict()))
