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
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedkd.assignment import sample_clients
from fedkd.client_node import LOSSES_KEY, ClientNode
from fedkd.config import Config, ConfigError, from_dict
from fedkd.contracts import Metrics
from fedkd.kd import build_loss
from fedkd.payloads import (
    ClassLogits,
    EmbeddedLogits,
    Logits,
    Payload,
    PayloadError,
    Prototypes,
    SoftLabels,
    Weights,
    check_finite,
)
from fedkd.registry import Registry
from fedkd.server_node import ServerNode
from fedkd.training import public_kd_targets, softmax_rows
from fedkd.weights import load_weights, model_weights

__all__ = [
    "CLIENT_STRATEGIES",
    "LOSSES_KEY",
    "RUNTIME_PARAMS",
    "SERVER_STRATEGIES",
    "ClassLogits",
    "ClientNode",
    "ClientStrategy",
    "EmbeddedLogits",
    "Logits",
    "Metrics",
    "NoParams",
    "Payload",
    "PayloadError",
    "Prototypes",
    "ServerNode",
    "ServerStrategy",
    "SoftLabels",
    "Weights",
    "check_finite",
    "load_weights",
    "make_params",
    "model_weights",
    "public_kd_targets",
    "softmax_rows",
]


@dataclass(frozen=True)
class NoParams:
    """For strategies without hyperparameters."""


#: strategy-table keys the runtime handles for every strategy (not the Params' fields):
#: ``losses``, the client training loss as a weighted list (:mod:`fedkd.kd.step`)
RUNTIME_PARAMS = ("losses",)


def make_params(cls: type, values: dict[str, Any], path: str) -> Any:
    """Build a strategy's params dataclass, naming ``path.<field>`` in any error. The
    runtime's own keys (:data:`RUNTIME_PARAMS`) are validated here and left out."""
    if "losses" in values:
        needs = build_loss(values["losses"], f"{path}.losses").needs
        if "prototypes" in needs:  # no runtime context has them: the term would never run
            raise ConfigError(
                f"{path}.losses",
                "a loss reads prototypes, which only a strategy's own step provides "
                "(e.g. fedproto's); it cannot be a configured loss",
            )
    values = {k: v for k, v in values.items() if k not in RUNTIME_PARAMS}
    try:
        return from_dict(cls, values, path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(path, str(err)) from None


class ClientStrategy(ABC):
    """What one client does each round. Subclass, set ``Params``, implement two hooks."""

    Params: ClassVar[type] = NoParams
    #: the name of the step loss this strategy trains with, if it has its own (FedProto's
    #: prototype loss): a configured ``strategy.losses`` is then refused before the run
    own_loss: ClassVar[str | None] = None
    _fedkd_hooks: ClassVar[bool] = True  # marks hook owners in error messages (ClientNode)

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    @classmethod
    def trains_in_groups(cls) -> bool:
        """Whether ``simulation.vectorize`` hands this strategy a message's clients of the
        same params at once: it overrides :meth:`train_group`, in the class that defines
        its :meth:`train` or a subclass of it (a subclass that overrides only ``train``
        must not inherit a group path that skips its override)."""

        def owner(name: str) -> type:
            return next(k for k in cls.__mro__ if name in vars(k))

        group = owner("train_group")
        return group is not ClientStrategy and issubclass(group, owner("train"))

    def setup(self, node: ClientNode) -> None:  # noqa: B027 - optional hook
        """Called once, the first time this client is sampled, after its student is built
        (e.g. FedMD's transfer-learning warm-up)."""

    @abstractmethod
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        """Learn this round: digest the server's ``targets`` (None in round 1 unless the
        server strategy sends initial targets) and/or train on private data. May change
        ``node.model``, ``node.optimizer`` and ``node.state``."""

    def train_group(self, nodes: list[ClientNode], targets: Payload | None) -> list[Metrics]:
        """:meth:`train` for several clients of this strategy and params at once, one
        metrics dict per node, in order; called instead of :meth:`train` only where
        ``simulation.vectorize`` is on and the strategy overrides it. Override to train
        them together, e.g. with :func:`fedkd.vectorize.train_private_group` (the
        ``train_private`` loop vectorised over clients of the same architecture); the
        results must equal :meth:`train` on each node within float tolerance. Default:
        :meth:`train` on each node in turn."""
        return [self.train(node, targets) for node in nodes]

    @abstractmethod
    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        """What to send the server (None: nothing). Must not change the student."""

    def evaluate(self, node: ClientNode) -> Metrics:
        """Extra metrics of this client after the round (e.g. accuracy by nearest
        prototype), recorded per client and round as ``eval_<name>`` beside the
        runtime's own test accuracy. Finite numbers only. Must not change the student
        and must not read sealed private data. Default: none."""
        return {}


class ServerStrategy(ABC):
    """How the server samples clients and turns their payloads into the next targets.

    Class attributes: ``Params`` (hyperparameters dataclass, shared with the client
    side), ``client_strategy`` (the client side clients run by default),
    ``uses_teacher`` (whether the server holds a global teacher model, built from
    ``server.teacher``), ``accepts`` (payload types :meth:`aggregate` takes; other
    payloads are rejected on arrival, with the reason logged and recorded) and
    ``clients_use_public`` (False: clients get an empty ``public_idx`` and the
    round's public indices are not sent, nor counted as bytes down; per round,
    :meth:`public_query` decides).

    Only :meth:`aggregate` is required. Call order per round: :meth:`sample`,
    :meth:`public_query`, :meth:`client_targets` (per sampled client), then, for the
    valid replies, :meth:`check_payload`, :meth:`aggregate`, :meth:`distill`,
    :meth:`evaluate`, :meth:`targets`.
    """

    Params: ClassVar[type] = NoParams
    client_strategy: ClassVar[type[ClientStrategy]]
    uses_teacher: ClassVar[bool] = True
    accepts: ClassVar[tuple[type[Payload], ...]] = (Payload,)
    clients_use_public: ClassVar[bool] = True
    # where the strategy is itself a DP mechanism, the stage it acts on (PATE: "votes"),
    # charging ServerNode.privacy itself; privacy.mechanism must then be "none"
    own_mechanism: ClassVar[str | None] = None
    # the strategy combines logits / soft labels with ServerNode.combine, so a robust
    # server.aggregator applies to it (other aggregators than "mean" are refused otherwise)
    uses_aggregator: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    @classmethod  # noqa: B027 - optional hook
    def check_config(cls, config: Config) -> None:
        """Reject configurations this algorithm cannot run (raise :class:`ConfigError`
        naming the field). Runs before any data is built or Ray starts."""

    def target_features(self) -> frozenset[str]:
        """The teacher features this strategy's targets can carry, which the clients'
        configured losses (``strategy.losses``) may read as ``teacher.<feature>``.
        Default: ``{"logits"}`` (payloads of logits or soft labels)."""
        return frozenset({"logits"})

    def aggregates_by_mean(self) -> bool:
        """True if :meth:`aggregate` only post-processes the plain (unweighted) mean of
        the payloads: a mechanism acting on the aggregate (central client-level DP) may
        then hand it one payload, the noisy mean (keyed -1). Default: False."""
        return False

    def setup(self, server: ServerNode) -> None:  # noqa: B027 - optional hook
        """Called once before round 1, after the teacher (if any) is built."""

    def sample(self, server: ServerNode, clients: int) -> list[int]:
        """Client ids that take part in round ``server.round``. Default: a seeded
        ``clients.fraction`` of all ``clients``."""
        return sample_clients(server.config, server.round)

    def public_query(self, server: ServerNode, public_idx: np.ndarray) -> np.ndarray:
        """The public indices the clients get in round ``server.round`` (each client's
        ``predict(node, public_idx)``): ``public_idx``, the round's seeded subset, or part
        of it; an empty array sends none (e.g. rounds in which the strategy asks nothing,
        as one-shot PATE before its query round). Payloads are validated against it.
        Default: ``public_idx`` if ``clients_use_public``, else an empty array."""
        return public_idx if self.clients_use_public else public_idx[:0]

    def client_targets(
        self, server: ServerNode, cid: int, targets: Payload | None
    ) -> Payload | None:
        """What client ``cid`` receives this round. Default: the shared ``targets``
        (from :meth:`targets` of the previous round; None in round 1)."""
        return targets

    def check_payload(  # noqa: B027 - optional hook
        self, server: ServerNode, cid: int, payload: Payload
    ) -> None:
        """Extra checks on an arriving payload (after its own ``validate``); raise
        :class:`PayloadError` to reject it. Default: none."""

    @abstractmethod
    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        """Combine the valid payloads of this round (keyed by client id, in id order)."""

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        """Optionally train server-side models on the aggregate. Default: nothing."""
        return {}

    def evaluate(self, server: ServerNode) -> Metrics:
        """Test metrics of the server's model(s), reported as the round's ``teacher``
        entry (an ``accuracy`` key is plotted). Default: the teacher, if any."""
        return server.evaluate(server.teacher) if server.teacher is not None else {}

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        """Targets sent with the next round, whose public subset is ``public_idx``
        (``aggregate`` is None when no valid payload arrived). Default: the aggregate."""
        return aggregate


def _is_subclass_of(base: type) -> Any:
    return lambda c: isinstance(c, type) and issubclass(c, base)


CLIENT_STRATEGIES: Registry[type[ClientStrategy]] = Registry(
    "client strategy",
    check=_is_subclass_of(ClientStrategy),
    autoload="strategies",
    group="fedkd.client_strategies",
)
SERVER_STRATEGIES: Registry[type[ServerStrategy]] = Registry(
    "strategy",
    check=_is_subclass_of(ServerStrategy),
    autoload="strategies",
    group="fedkd.strategies",
)
