"""Transfer-only: each client pre-trains on the labelled public set, then trains on its
private data, with no collaboration. FedMD's own control (Li & Wang 2019, §4: the
"transfer learning" phase without the communicate/digest rounds): with it, a gain can
be split into what the public labels give and what collaboration gives.

The setup is FedMD's (``transfer_epochs`` on the public set, then ``private_epochs`` on
the private set, the first time a client is sampled); every round then trains
``clients.local_epochs`` on the private data, as FedMD's revisit does by default.
Nothing is sent. Needs a labelled public set (refused otherwise, as FedMD is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.payloads import Payload
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
class TransferParams:
    transfer_epochs: int = 2  # labelled public set, once (FedMD's default)
    private_epochs: int = 3  # private set, once, after the transfer (FedMD's default)

    def __post_init__(self) -> None:
        for name in ("transfer_epochs", "private_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@CLIENT_STRATEGIES.register("transfer")
class TransferClient(ClientStrategy):
    """Public-set transfer learning once, then private training only; sends nothing."""

    Params = TransferParams

    def setup(self, node: ClientNode) -> None:
        node.train_on(node.public_x, node.public_y, epochs=self.params.transfer_epochs)
        node.train_private(epochs=self.params.private_epochs)

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        return node.train_private()

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        return None


@SERVER_STRATEGIES.register("transfer")
class TransferServer(ServerStrategy):
    """Receives nothing, holds no model."""

    Params = TransferParams
    client_strategy = TransferClient
    uses_teacher = False
    clients_use_public = False

    @classmethod
    def check_config(cls, config: Config) -> None:
        public = config.data.public
        if getattr(public, "is_proxy", False) and not public.labelled:
            raise ConfigError(
                "data.public.labelled",
                f"transfer-only trains on the public labels, but the proxy set "
                f"{public.dataset} is unlabelled; set data.public.labelled = true with a "
                "proxy of the private dataset, or use an int data.public",
            )

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        return None
