"""The plug-in API: a federated KD algorithm is a client strategy plus a server strategy.

The runtime owns the round loop. Each round, for every sampled client::

    targets  = ServerStrategy.targets(...)        # from the previous round (None in round 1)
    metrics  = ClientStrategy.train(node, targets)  # digest targets + local training
    payload  = ClientStrategy.predict(node, public_idx)
    # ... the student is evaluated on the test set, the payload travels to the server ...
    agg      = ServerStrategy.aggregate(server, {cid: payload})
    metrics  = ServerStrategy.distill(server, agg)   # e.g. train the global teacher
    targets  = ServerStrategy.targets(server, agg, next_public_idx)

Hooks see typed payloads and the node objects below, never Flower records, so a
strategy runs unchanged under Flower+Ray and in the in-process runner.

Example:
    >>> @dataclass(frozen=True)
    ... class MyParams:
    ...     temperature: float = 2.0
    >>> class MyClient(ClientStrategy):
    ...     Params = MyParams
    ...     def train(self, node, targets):
    ...         t = self.params.temperature
    ...         return node.train_private(kd=targets, kd_weight=0.5, temperature=t)
    ...     def predict(self, node, public_idx):
    ...         return Logits(public_idx, node.public_logits(public_idx))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedkd.config import ClientsConfig, Config, ConfigError, ServerConfig, from_dict
from fedkd.losses import KD_LOSSES
from fedkd.payloads import Logits, Payload
from fedkd.registry import Registry
from fedkd.training import KDTargets, distill, evaluate, predict_logits, train_supervised

Metrics = dict[str, float]


@dataclass(frozen=True)
class NoParams:
    """For strategies without hyperparameters."""


def make_params(cls: type, values: dict[str, Any], path: str) -> Any:
    """Build a strategy's params dataclass, naming ``path.<field>`` in any error."""
    try:
        return from_dict(cls, values, path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(path, str(err)) from None


def public_kd_targets(
    public_x: torch.Tensor, targets: Logits, temperature: float, loss: str = "soft_kl"
) -> KDTargets:
    """Logits on public indices -> (public inputs, targets, loss) on ``public_x``'s device."""
    idx = torch.as_tensor(targets.idx, dtype=torch.long, device=public_x.device)
    logits = torch.as_tensor(targets.values, dtype=torch.float32, device=public_x.device)
    kwargs = {"temperature": temperature} if loss == "soft_kl" else {}
    return KDTargets(public_x[idx], logits, KD_LOSSES.get(loss)(**kwargs))


@dataclass
class ClientNode:
    """One client as a strategy sees it: its student, data and persistent state.

    ``state`` holds extra arrays a strategy wants to keep across rounds (saved with
    the student). Tensors live on ``device``.
    """

    cid: int
    round: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    settings: ClientsConfig
    generator: torch.Generator
    device: torch.device
    state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def kd_targets(self, targets: Logits, temperature: float, loss: str = "soft_kl") -> KDTargets:
        """Pair server targets with this client's copy of the public inputs."""
        return public_kd_targets(self.public_x, targets, temperature, loss)

    def train_private(
        self,
        *,
        epochs: int | None = None,
        kd: Logits | None = None,
        kd_weight: float = 0.0,
        temperature: float = 1.0,
    ) -> Metrics:
        """Local epochs of cross-entropy, mixed with distillation towards ``kd`` if given."""
        return train_supervised(
            self.model,
            self.optimizer,
            self.x,
            self.y,
            epochs=self.settings.local_epochs if epochs is None else epochs,
            batch_size=self.settings.batch_size,
            generator=self.generator,
            kd=self.kd_targets(kd, temperature) if kd is not None else None,
            kd_weight=kd_weight,
        )

    def distill_public(self, targets: Logits, *, epochs: int, temperature: float) -> Metrics:
        """Epochs of pure distillation towards ``targets`` on the public inputs."""
        return distill(
            self.model,
            self.optimizer,
            self.kd_targets(targets, temperature),
            epochs=epochs,
            batch_size=self.settings.batch_size,
            generator=self.generator,
        )

    def public_logits(self, idx: np.ndarray) -> np.ndarray:
        """The student's logits on public samples ``idx`` (float32, eval mode)."""
        x = self.public_x[torch.as_tensor(idx, dtype=torch.long, device=self.device)]
        return predict_logits(self.model, x).cpu().numpy().astype(np.float32)

    def evaluate(self) -> Metrics:
        return evaluate(self.model, self.test_x, self.test_y)


@dataclass
class ServerNode:
    """The server as a strategy sees it: the global teacher (if any) and the public set."""

    round: int
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    settings: ServerConfig
    generator: torch.Generator
    num_examples: dict[int, int] = field(default_factory=dict)  # private-set size per client
    state: dict[str, Any] = field(default_factory=dict)

    def distill_teacher(self, targets: Logits, *, temperature: float) -> Metrics:
        """``settings.epochs`` of distillation of the teacher towards ``targets``."""
        if self.teacher is None or self.optimizer is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        return distill(
            self.teacher,
            self.optimizer,
            public_kd_targets(self.public_x, targets, temperature),
            epochs=self.settings.epochs,
            batch_size=self.settings.batch_size,
            generator=self.generator,
        )

    def teacher_logits(self, idx: np.ndarray) -> Logits:
        if self.teacher is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        x = self.public_x[torch.as_tensor(idx, dtype=torch.long)]
        return Logits(np.asarray(idx, dtype=np.int64), predict_logits(self.teacher, x).numpy())


class ClientStrategy(ABC):
    """What one client does each round. Subclass, set ``Params``, implement two hooks."""

    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    def setup(self, node: ClientNode) -> None:  # noqa: B027 - optional hook
        """Called once, the first time this client is sampled, after its student is built."""

    @abstractmethod
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        """Learn this round: digest the server's ``targets`` (None in round 1) and/or
        train on private data. May change ``node.model`` and ``node.state``."""

    @abstractmethod
    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        """What to send the server (None: nothing). Must not change the student."""


class ServerStrategy(ABC):
    """How the server turns client payloads into the next round's targets.

    Class attributes: ``Params`` (hyperparameters dataclass, shared with the client
    side), ``client_strategy`` (the client side clients run by default) and
    ``uses_teacher`` (whether the server holds a global teacher model).
    """

    Params: ClassVar[type] = NoParams
    client_strategy: ClassVar[type[ClientStrategy]]
    uses_teacher: ClassVar[bool] = True

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    def setup(self, server: ServerNode) -> None:  # noqa: B027 - optional hook
        """Called once before round 1, after the teacher (if any) is built."""

    @abstractmethod
    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        """Combine the valid payloads of this round (keyed by client id, in id order)."""

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        """Optionally train the teacher on the aggregate. Default: nothing."""
        return {}

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        """Targets sent with the next round, whose public subset is ``public_idx``.
        Default: the aggregate itself."""
        return aggregate


def _is_subclass_of(base: type) -> Any:
    return lambda c: isinstance(c, type) and issubclass(c, base)


CLIENT_STRATEGIES: Registry[type[ClientStrategy]] = Registry(
    "client strategy", check=_is_subclass_of(ClientStrategy), autoload="strategies"
)
SERVER_STRATEGIES: Registry[type[ServerStrategy]] = Registry(
    "strategy", check=_is_subclass_of(ServerStrategy), autoload="strategies"
)


def server_strategy(config: Config) -> ServerStrategy:
    """The configured server strategy, with its params validated."""
    cls = SERVER_STRATEGIES.get(config.strategy.name)
    return cls(make_params(cls.Params, config.strategy.params, "strategy"))


def client_strategy(config: Config, cid: int) -> ClientStrategy:
    """Client ``cid``'s strategy: an explicit ``clients.strategies`` range, else the default."""
    from fedkd.config import parse_id_range

    for key, spec in config.clients.strategies.items():
        if cid in parse_id_range(key, config.clients.count, "clients.strategies"):
            cls = CLIENT_STRATEGIES.get(spec.name)
            return cls(make_params(cls.Params, spec.params, f"clients.strategies.{key}"))
    server_cls = SERVER_STRATEGIES.get(config.strategy.name)
    cls = server_cls.client_strategy
    return cls(make_params(cls.Params, config.strategy.params, "strategy"))
