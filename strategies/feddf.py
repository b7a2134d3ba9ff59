"""FedDF (Lin et al., NeurIPS 2020, arXiv:2006.07242): ensemble distillation for
model fusion, with heterogeneous architectures.

Clients run FedAvg's local update from their architecture's server model and send
weights. The server (1) averages the weights of each architecture's clients
(weighted by private-set size) into that architecture's prototype, then (2)
distils every prototype on the unlabelled public set towards the ensemble of
*all* received client models (across architectures): the mean of their logits
(AVGLOGITS), KL at temperature ``temperature``, Adam at ``server.lr``. Each client
receives its architecture's distilled prototype next round.

Architectures with no client in a round keep their model (Algorithm 1 fuses the
received models only).

Deviations: a fixed ``server.epochs`` passes over the round's public subset with a
fresh optimizer, instead of the paper's up to 10^4 steps with early stopping on a
server-side validation split (returning the best checkpoint); the paper's cosine
annealing and clipping at 5 are ``server.schedule = { name = "cosine", clock = "step" }``
and ``server.grad_clip = 5`` (the default is a constant rate, no clipping); the KL
carries a T^2 factor (none in the paper, equal at the default T = 1); ``weighted``
defaults to a size-weighted average, the authors' code averages uniformly.

BatchNorm: the ensemble's logits come from each client model in eval mode (its own
running statistics). The per-architecture average covers BatchNorm's running
statistics too (weighted like the parameters; ``num_batches_tracked`` keeps the first
client's count), and the distillation then runs in train mode, so the prototypes'
running statistics move towards the public set's, as in the authors' code (their
``NoiseKTSolver`` trains the student in train mode on the unlabelled data, teachers in
eval mode); their FedAvg step copies averaged *parameters* only and keeps the last
client's BatchNorm buffers, which that distillation then re-estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.config import ConfigError
from fedkd.payloads import Logits, Payload, Weights
from fedkd.strategy import (
    SERVER_STRATEGIES,
    Metrics,
    ServerNode,
    ServerStrategy,
    load_weights,
    model_weights,
)
from strategies.fedavg import FedAvgClient


@dataclass(frozen=True)
class FedDFParams:
    temperature: float = 1.0  # KL temperature of the server-side distillation
    weighted: bool = True  # weight each architecture's average by private-set size

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


@SERVER_STRATEGIES.register("feddf")
class FedDFServer(ServerStrategy):
    Params = FedDFParams
    client_strategy = FedAvgClient
    uses_teacher = False
    clients_use_public = False
    accepts = (Weights,)
    uses_aggregator = True  # for the logit ensemble (AVGLOGITS); weights are averaged plainly

    def _prototype(self, server: ServerNode, cid: int):
        arch = str(server.student_spec(cid))
        models = server.state.setdefault("models", {})
        if arch not in models:
            models[arch] = server.build_model(server.student_spec(cid))
        return models[arch]

    def _sent(self, server: ServerNode, cid: int) -> Weights:
        """Client ``cid``'s prototype weights, extracted once per round and architecture."""
        arch = str(server.student_spec(cid))
        sent = server.state.setdefault("sent", {})
        if sent.get(arch, (None,))[0] != server.round:
            sent[arch] = (server.round, model_weights(self._prototype(server, cid)))
        return sent[arch][1]

    def client_targets(self, server: ServerNode, cid: int, targets: Payload | None) -> Payload:
        return self._sent(server, cid)

    def check_payload(self, server: ServerNode, cid: int, payload: Payload) -> None:
        assert isinstance(payload, Weights)
        payload.check_like(self._sent(server, cid))

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        """Average weights per architecture; return the ensemble's mean public logits."""
        size = {cid: server.num_examples[cid] if self.params.weighted else 1 for cid in payloads}
        groups: dict[str, list[int]] = {}
        for cid in payloads:
            groups.setdefault(str(server.student_spec(cid)), []).append(cid)
        logits: dict[int, Logits] = {}
        for cids in groups.values():
            prototype = self._prototype(server, cids[0])
            for cid in cids:  # each client model's logits, for the ensemble
                load_weights(prototype, payloads[cid])  # type: ignore[arg-type]
                logits[cid] = server.logits(prototype, server.public_idx)
            avg = Weights.mean([payloads[c] for c in cids], [size[c] for c in cids])  # type: ignore[misc]
            load_weights(prototype, avg)
        server.state["fused"] = sorted(groups)  # the architectures that took part this round
        return server.combine(logits)  # AVGLOGITS: the uniform mean, as in the paper

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        assert isinstance(aggregate, Logits)
        out: Metrics = {}
        fused = set(server.state.get("fused", server.state["models"]))
        for arch, model in server.state["models"].items():
            if arch not in fused:  # no client of it this round: it keeps its model (Alg. 1)
                continue
            before = server.evaluate(model)["accuracy"]
            m = server.distill_into(
                model, server.make_optimizer(model), aggregate, temperature=self.params.temperature
            )
            out[f"kd/{arch}"] = m["kd"]
            out[f"accuracy_before_distill/{arch}"] = before
        return out

    def evaluate(self, server: ServerNode) -> Metrics:
        models = server.state.get("models", {})
        out = {f"accuracy/{a}": server.evaluate(m)["accuracy"] for a, m in models.items()}
        if out:
            out["accuracy"] = float(np.mean(list(out.values())))
        return out
