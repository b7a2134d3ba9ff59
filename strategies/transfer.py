"""Transfer-only: each client pre-trains on the labelled public set, then trains on its
private data, with no collaboration. FedMD's own control (Li & Wang 2019, §4: the
"transfer learning" phase without the communicate/digest rounds): with it, a gain can
be split into what the public labels give and what collaboration gives.

The setup is FedMD's (``transfer_epochs`` on the public set, then ``private_epochs`` on
the private set, the first time a client is sampled); every round then trains
``clients.local_epochs`` on the private data, as local-only training does. Nothing is
sent. Needs a labelled public set (refused otherwise, as FedMD is).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.config import Config, ConfigError
from fedkd.strategy import CLIENT_STRATEGIES, SERVER_STRATEGIES, ClientNode
from strategies.fedmd import check_labelled_public, transfer_learning
from strategies.local import LocalClient, LocalServer


@dataclass(frozen=True)
class TransferParams:
    transfer_epochs: int = 2  # labelled public set, once (FedMD's default)
    private_epochs: int = 3  # private set, once, after the transfer (FedMD's default)

    def __post_init__(self) -> None:
        for name in ("transfer_epochs", "private_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@CLIENT_STRATEGIES.register("transfer")
class TransferClient(LocalClient):
    """FedMD's transfer learning once, then local-only training; sends nothing."""

    Params = TransferParams

    def setup(self, node: ClientNode) -> None:
        transfer_learning(node, self.params.transfer_epochs, self.params.private_epochs)


@SERVER_STRATEGIES.register("transfer")
class TransferServer(LocalServer):
    """Receives nothing, holds no model."""

    Params = TransferParams
    client_strategy = TransferClient

    @classmethod
    def check_config(cls, config: Config) -> None:
        check_labelled_public(config, "transfer")
