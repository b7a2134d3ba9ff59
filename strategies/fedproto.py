"""FedProto (Tan et al., 2022, "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI, arXiv:2105.00243): clients exchange class prototypes,
no public set, no model weights.

A client's prototype of class j is the mean embedding (the classifier's input,
``fedkd.models.features(...)["embedding"]``) of its private samples of class j
(Eq. 4). Each client trains with ``CE + ld * MSE(e_i, P[y_i])``: cross-entropy plus
the mean squared distance between the embedding of each private sample and the
global prototype of its class (Eq. 5 with the authors' code's per-sample MSE,
``nn.MSELoss()`` over the batch and the embedding width; a sample whose class has no
global prototype contributes 0 but counts in the mean; no term at all before the
first prototypes arrive). ``ld`` defaults to 1, the paper's and the code's value for
MNIST and FEMNIST. The local prototypes are collected *during* local training, as in
Algorithm 1: the training-mode embeddings of the steps of the last local epoch (the
authors' ``update_weights_het`` resets its per-label lists each epoch), so their
counts are the client's sample counts per class. The server averages each class's
prototypes over the clients that hold the class, weighted by sample count,
``sum_i |D_i,j| / N_j * C_i^(j)`` (Eq. 6, see the deviations), and sends the same
global prototypes to every client (no leave-own-out). Clients also report the
paper's prototype inference (``argmin_j ||f(x) - C^(j)||_2`` over the classes with a
global prototype) on the test set as ``eval_proto_accuracy``, beside the runtime's
usual accuracy of the classifier head.

Every client's embedding must have the same width: checked before the run where the
input shape is known from the config (built-in datasets), else when the server is set
up, and on every arriving payload.

Deviations:

- Eq. 6 as printed carries an extra factor ``1 / |N_j|`` in front of the weighted sum,
  which would shrink each prototype by the number of clients holding the class; the
  appendix defines the global prototype as a weighted sum whose weights sum to 1, and
  that is what is computed here. The authors' code (``proto_aggregation``) averages
  without weights: ``weighted = false``.
- Evaluation is on fedkd's global test set (the code tests each client on a local test
  set of its own classes and restricts the nearest-prototype search to them), and a
  client evaluates with the global prototypes it received at the start of the round
  (one aggregation older than its model; the code's final test uses the prototypes
  aggregated after the last round).
- The optimizer, batch size and local epochs are fedkd's ``[clients]`` settings (the
  paper: SGD lr 0.01 momentum 0.5, batch 8, 1 local epoch).
- Refused under ``privacy.mechanism = "dpsgd"`` (the prototypes and the custom loss
  are outside DP-SGD) and ``client_gaussian`` (it noises logits only).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from fedkd.config import Config, ConfigError
from fedkd.data.datasets import DATASETS, OFFICIAL_SHAPES
from fedkd.kd import Batch, CrossEntropy, PrototypeMatching
from fedkd.kd.step import StepLoss
from fedkd.models import FeatureError, build_model, feature_shapes, features
from fedkd.payloads import Payload, PayloadError, Prototypes
from fedkd.privacy import mechanism_of
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
)
from fedkd.training import ClassMeans

STATE_KEY = "fedproto_global"  # node.state: the global prototypes the client last received
MNIST1D_LENGTH = 40  # mnist1d's default final_seq_length (its samples' length)


@dataclass(frozen=True)
class FedProtoParams:
    ld: float = 1.0  # lambda, the weight of the prototype term (the code's --ld)
    weighted: bool = True  # Eq. 6: weight by sample count; false: the code's plain mean

    def __post_init__(self) -> None:
        if not self.ld >= 0:
            raise ConfigError("ld", f"must be >= 0, got {self.ld}")


class ProtoStep(StepLoss):
    """One FedProto training step: ``CE + ld * proto`` on the private batch, ``proto``
    being fedkd's :class:`~fedkd.kd.PrototypeMatching` towards ``prototypes`` (rows
    with ``mask`` False are classes without a global prototype). Without prototypes
    the step is the cross-entropy alone."""

    needs = frozenset({"student.logits", "student.embedding", "labels"})

    def __init__(
        self,
        ld: float,
        prototypes: Tensor | None = None,
        mask: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ld = ld
        self.prototypes = prototypes
        self.mask = mask
        self.ce = CrossEntropy(label_smoothing)
        self.proto = PrototypeMatching()

    def forward(self, main: Batch, paired: Batch | None) -> Tensor:
        ce = self.ce(main)
        terms = {"ce": float(ce.detach())}
        loss = ce
        if self.prototypes is not None:
            batch = replace(main, prototypes=self.prototypes, prototype_mask=self.mask)
            proto = self.proto(batch)
            terms["proto"] = float(proto.detach())
            loss = ce + self.ld * proto
        self.terms = terms
        return loss


@dataclass
class LastEpochMeans(ClassMeans):
    """:class:`ClassMeans` that keeps only the last epoch's outputs: it starts afresh
    once ``per_epoch`` samples have been added (the runtime's loop visits every private
    sample exactly once per epoch)."""

    per_epoch: int = 0
    seen: int = field(default=0, repr=False)

    def add(self, out: Tensor, y: Tensor) -> None:
        if self.per_epoch and self.seen >= self.per_epoch:
            self.sums, self.counts, self.seen = None, None, 0
        super().add(out, y)
        self.seen += len(y)


def proto_targets(protos: Prototypes, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(prototypes [classes, D], mask [classes] bool)`` on ``device``."""
    means = torch.as_tensor(protos.means, dtype=torch.float32, device=device)
    return means, torch.as_tensor(protos.counts > 0, device=device)


@torch.no_grad()
def nearest_prototype(
    model: torch.nn.Module, x: Tensor, prototypes: Tensor, mask: Tensor, chunk: int = 1024
) -> Tensor:
    """Each input's class by the nearest prototype (L2) among the rows with ``mask``
    True, from ``model``'s embedding in eval mode (the model's mode is restored)."""
    classes = torch.nonzero(mask).flatten()
    rows = prototypes[classes]
    was_training = model.training
    model.eval()
    try:
        preds = []
        for part in x.split(chunk):
            emb = features(model, part)["embedding"].float()
            preds.append(classes[torch.cdist(emb, rows.to(emb)).argmin(dim=1)])
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


@CLIENT_STRATEGIES.register("fedproto")
class FedProtoClient(ClientStrategy):
    Params = FedProtoParams
    own_loss = "CE + ld * prototype MSE"

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        protos = mask = None
        if isinstance(targets, Prototypes):
            node.state[STATE_KEY] = {"means": targets.means, "counts": targets.counts}
            protos, mask = proto_targets(targets, node.device)
        step = ProtoStep(self.params.ld, protos, mask, node.recipe.label_smoothing)
        self.means = LastEpochMeans(
            node.num_classes, softmax=False, key="embedding", per_epoch=node.num_examples
        )
        return node.train_private(step=step, class_means=self.means)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        if self.means.counts is None:  # no training step ran (no local epochs): nothing
            return None
        return Prototypes(*self.means.means())

    def evaluate(self, node: ClientNode) -> Metrics:
        """Test accuracy of the nearest global prototype (none before any arrived)."""
        kept = node.state.get(STATE_KEY)
        if kept is None or not (np.asarray(kept["counts"]) > 0).any():
            return {}
        protos, mask = proto_targets(Prototypes(kept["means"], kept["counts"]), node.device)
        pred = nearest_prototype(node.model, node.test_x, protos, mask)
        return {"proto_accuracy": float((pred == node.test_y).float().mean())}


def aggregate_prototypes(payloads: dict[int, Prototypes], weighted: bool) -> Prototypes:
    """Per class, the mean of the clients' prototypes over the clients holding the class,
    weighted by their sample counts (``weighted``) or equally; ``counts`` of the result:
    how many clients each row averages (0: no client has the class, the row is 0)."""
    first = next(iter(payloads.values()))
    sums = np.zeros(first.means.shape, np.float64)
    mass = np.zeros(len(first.counts), np.float64)
    holders = np.zeros(len(first.counts), np.float64)
    for p in payloads.values():
        has = p.counts > 0
        w = np.where(has, p.counts, 0.0) if weighted else has.astype(np.float64)
        sums += w[:, None] * p.means.astype(np.float64)
        mass += w
        holders += has
    means = np.divide(sums, mass[:, None], out=np.zeros_like(sums), where=mass[:, None] > 0)
    return Prototypes(means.astype(np.float32), holders.astype(np.float32))


def known_input_shape(config: Config) -> tuple[int, ...] | None:
    """The inputs' shape, where the config alone tells it (built-in datasets); None
    otherwise (e.g. ``hf`` or a user's dataset: known once the data is built)."""
    spec = config.data.dataset
    if spec.name in OFFICIAL_SHAPES:
        return tuple(OFFICIAL_SHAPES[spec.name])
    if spec.name == "mnist1d":
        return (int(spec.params.get("final_seq_length", MNIST1D_LENGTH)),)
    if spec.name == "digits":
        return (64,)
    if spec.name == "synthetic":
        default = inspect.signature(DATASETS.get("synthetic")).parameters["num_features"].default
        return (int(spec.params.get("num_features", default)),)
    return None


def feature_widths(
    config: Config, input_shape: tuple[int, ...], key: str = "embedding", num_classes: int = 10
) -> dict[str, tuple[int, list[int]]]:
    """Each distinct student architecture's flattened width of feature ``key`` (default:
    the embedding, the input of its final linear layer) and the clients using it."""
    from fedkd.assignment import student_spec

    widths: dict[str, tuple[int, list[int]]] = {}
    for cid in range(config.clients.count):
        spec = student_spec(config, cid)
        name = str(spec)
        if name not in widths:
            model = build_model(spec, input_shape, num_classes, seed=0)
            shapes = feature_shapes(model, input_shape)
            if key not in shapes:
                raise FeatureError(f"{name} has no feature {key!r} (it has {', '.join(shapes)})")
            widths[name] = (math.prod(shapes[key]), [])
        widths[name][1].append(cid)
    return widths


def _models_field(config: Config) -> str:
    return "clients.model_groups" if config.clients.model_groups else "clients.models"


def check_widths(
    config: Config,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    *,
    key: str = "embedding",
    strategy: str = "fedproto",
    why: str = "exchanges class prototypes, so every client's embedding (the input of its "
    "final linear layer) must have the same width",
) -> int:
    """The common flattened width of every client's student feature ``key``; a
    ConfigError naming ``strategy`` and ``why`` if the widths differ or a student lacks
    the feature (FedGKT uses it for the features it uploads)."""
    try:
        widths = feature_widths(config, input_shape, key, num_classes)
    except FeatureError as err:
        raise ConfigError(
            _models_field(config), f"{strategy} needs every student's {key!r}: {err}"
        ) from None
    if len({w for w, _ in widths.values()}) > 1:
        found = "; ".join(
            f"{name}: {w} (clients {', '.join(map(str, cids))})"
            for name, (w, cids) in widths.items()
        )
        raise ConfigError(
            _models_field(config),
            f"{strategy} {why}; on inputs of shape {tuple(input_shape)} the widths are "
            f"{found}. Choose model parameters that give one width "
            "(fedkd.models.feature_shapes)",
        )
    return next(iter(widths.values()))[0]


@SERVER_STRATEGIES.register("fedproto")
class FedProtoServer(ServerStrategy):
    Params = FedProtoParams
    client_strategy = FedProtoClient
    uses_teacher = False
    clients_use_public = False
    accepts = (Prototypes,)

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Equal embedding widths (where the input shape is known now) and no DP-SGD (a
        ``strategy.losses`` list is refused through ``FedProtoClient.own_loss``)."""
        if mechanism_of(config).seals:
            raise ConfigError(
                "privacy.mechanism",
                f"fedproto cannot run under {config.privacy.mechanism!r}: its prototypes "
                "(mean embeddings of private samples) and its prototype loss are computed "
                "outside the mechanism's private training (e.g. DP-SGD); use mechanism = 'none'",
            )
        shape = known_input_shape(config)
        if shape is None:
            return  # checked in setup, once the data is built
        try:
            check_widths(config, shape)
        except ConfigError:
            raise
        except Exception:  # a model unfit for these inputs: fedkd reports it
            return

    def setup(self, server: ServerNode) -> None:
        shape = tuple(server.test_x.shape[1:])
        server.state["dim"] = check_widths(server.config, shape, server.num_classes)

    def check_payload(self, server: ServerNode, cid: int, payload: Payload) -> None:
        assert isinstance(payload, Prototypes)
        dim = server.state.get("dim")
        if dim is not None and payload.means.shape[1] != dim:
            raise PayloadError(
                f"prototypes of width {payload.means.shape[1]}, expected {dim} (every "
                "client's embedding width)"
            )

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        received = {c: p for c, p in payloads.items() if isinstance(p, Prototypes)}
        return aggregate_prototypes(received, self.params.weighted) if received else None
