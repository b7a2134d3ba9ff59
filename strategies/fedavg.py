"""FedAvg (McMahan et al., 2017, arXiv:1602.05629): weight averaging, the baseline
that federated distillation is measured against, and the yardstick for bytes sent.

Each round the server sends the global model to every sampled client; a client
loads it, trains ``clients.local_epochs`` epochs on its private data with a fresh
optimizer, and sends its weights back; the server averages them weighted by
private-set size. Deviations: none in the algorithm; the client optimizer is
``clients.optimizer`` (Adam by default, the paper uses SGD), and each client's
accuracy is its local model's after training, while the global model's is the
round's server accuracy.

BatchNorm: the payload is the whole state dict, so the running statistics
(``running_mean``, ``running_var``) are averaged with the same weights as the
parameters; the integer counter ``num_batches_tracked`` is not averaged but keeps
the first received client's count (:meth:`~fedkd.payloads.Weights.mean`; it only
matters for BatchNorm with ``momentum=None``, which no zoo model uses). Every model
is evaluated in eval mode, on these averaged statistics.
"""

from __future__ import annotations

import numpy as np

from fedkd.config import Config, ConfigError
from fedkd.payloads import Payload, Weights
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
    load_weights,
    model_weights,
)


@CLIENT_STRATEGIES.register("fedavg")
class FedAvgClient(ClientStrategy):
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        if isinstance(targets, Weights):
            node.load_weights(targets)
            node.reset_optimizer()
        return node.train_private()

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return node.weights()


@SERVER_STRATEGIES.register("fedavg")
class FedAvgServer(ServerStrategy):
    client_strategy = FedAvgClient
    uses_teacher = False
    clients_use_public = False
    accepts = (Weights,)

    @classmethod
    def check_config(cls, config: Config) -> None:
        from fedkd.assignment import student_spec

        specs = {str(student_spec(config, cid)) for cid in range(config.clients.count)}
        if len(specs) > 1:
            raise ConfigError(
                "clients.models",
                f"fedavg averages weights, so every client needs the same architecture; "
                f"got {sorted(specs)} (use feddf for heterogeneous models)",
            )

    def setup(self, server: ServerNode) -> None:
        server.state["model"] = server.build_model(server.student_spec(0))

    def _global(self, server: ServerNode) -> Weights:
        """The global model's weights, extracted once per round (one copy for all clients)."""
        if server.state.get("sent_round") != server.round:
            server.state["sent"] = model_weights(server.state["model"])
            server.state["sent_round"] = server.round
        return server.state["sent"]

    def client_targets(self, server: ServerNode, cid: int, targets: Payload | None) -> Payload:
        return self._global(server)

    def check_payload(self, server: ServerNode, cid: int, payload: Payload) -> None:
        assert isinstance(payload, Weights)
        payload.check_like(self._global(server))

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        weights = [p for p in payloads.values() if isinstance(p, Weights)]
        avg = Weights.mean(weights, [server.num_examples[cid] for cid in payloads])
        load_weights(server.state["model"], avg)
        return avg

    def evaluate(self, server: ServerNode) -> Metrics:
        return server.evaluate(server.state["model"])
