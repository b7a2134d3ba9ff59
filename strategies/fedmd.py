"""FedMD (Li & Wang, 2019, arXiv:1910.03581): heterogeneous federated learning via
model distillation on a labelled public set.

Transfer learning (once, the first time a client is sampled): train on the
labelled public set for ``transfer_epochs``, then on the private set for
``private_epochs``. Then every round: *communicate* — each client sends its class
scores (logits) on the round's public subset (``server.public_subset``); the
server averages them into the consensus; *digest* — each client trains its logits
towards the consensus on that subset (``digest_epochs``, L1 loss on logits as in
the authors' code); *revisit* — ``revisit_epochs`` on its private data (by
default ``clients.local_epochs``, the same private budget as every other strategy;
the authors' configs use 2-4, and 10 in their CIFAR non-i.i.d. setting).

Deviations: in our message order a client digests the consensus of round r at
the start of round r+1, immediately followed by the revisit and the next
communicate, so the sequence of steps is the paper's. The public set's labels are
used in the transfer phase only (FedMD assumes a labelled public set; no other
built-in strategy touches them). The server holds no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.payloads import Logits, Payload
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
)


@dataclass(frozen=True)
class FedMDParams:
    transfer_epochs: int = 2  # labelled public set, once, the first time the client is sampled
    private_epochs: int = 3  # private set, once, after the public-set transfer
    digest_epochs: int = 1  # towards the consensus on the public subset, each round
    revisit_epochs: int | None = None  # private set, each round; None: clients.local_epochs
    loss: str = "mae"  # digest loss on logits ("mae" in the authors' code; or mse, soft_kl)
    temperature: float = 1.0  # only used if loss = "soft_kl"

    def __post_init__(self) -> None:
        for name in ("transfer_epochs", "private_epochs", "digest_epochs", "revisit_epochs"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.loss not in ("mae", "mse", "soft_kl"):  # the consensus is logits
            raise ConfigError("loss", f"must be mae, mse or soft_kl (on logits), got {self.loss!r}")


def transfer_learning(node: ClientNode, transfer_epochs: int, private_epochs: int) -> None:
    """FedMD's transfer phase: the labelled public set, then the private set."""
    node.train_on(node.public_x, node.public_y, epochs=transfer_epochs)
    node.train_private(epochs=private_epochs)


def check_labelled_public(config: Config, strategy: str) -> None:
    """Refuse an unlabelled proxy set for a strategy that trains on the public labels."""
    public = config.data.public
    if getattr(public, "is_proxy", False) and not public.labelled:
        raise ConfigError(
            "data.public.labelled",
            f"{strategy} needs a labelled public set, but the proxy set {public.dataset} is "
            "unlabelled (public_y is -1); set data.public.labelled = true with a proxy of "
            "the private dataset, use an int data.public (a labelled slice of the private "
            "data) or another strategy",
        )


@CLIENT_STRATEGIES.register("fedmd")
class FedMDClient(ClientStrategy):
    Params = FedMDParams

    def setup(self, node: ClientNode) -> None:
        transfer_learning(node, self.params.transfer_epochs, self.params.private_epochs)

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        p, out = self.params, {}
        if isinstance(targets, Logits) and p.digest_epochs:
            kd = node.distill_public(
                targets, epochs=p.digest_epochs, temperature=p.temperature, loss=p.loss
            )
            out["digest"] = kd["kd"]
        out.update(node.train_private(epochs=p.revisit_epochs))
        return out

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return Logits(public_idx, node.public_logits(public_idx))


@SERVER_STRATEGIES.register("fedmd")
class FedMDServer(ServerStrategy):
    Params = FedMDParams
    client_strategy = FedMDClient
    uses_teacher = False
    accepts = (Logits,)
    uses_aggregator = True

    @classmethod
    def check_config(cls, config: Config) -> None:
        """FedMD's transfer phase trains on the public labels: refuse an unlabelled proxy set."""
        check_labelled_public(config, "fedmd")

    def aggregates_by_mean(self) -> bool:
        return True

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        return server.combine({c: p for c, p in payloads.items() if isinstance(p, Logits)})
