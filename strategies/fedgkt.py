"""FedGKT: group knowledge transfer (He, Annavaram & Avestimehr, "Group Knowledge
Transfer: Federated Learning of Large CNNs at the Edge", NeurIPS 2020, arXiv:2007.14513).

Each client k trains its small model (a feature extractor plus a classifier: fedkd's
student) on its private data with ``CE + kd_weight * KD(z_c, z_s)`` (the paper's client
loss, Eq. 5 / Algorithm 1), ``z_s`` being the server model's logits on *this client's own
samples*, received at the start of the round (none in round 1: CE alone). After local
training it extracts, for every private sample in its private order, the feature ``H``
(eval mode), its logits ``z_c`` and its label, and uploads them (:class:`GKTFeatures`).
The server trains a larger model ``f_s`` that takes features as its input with
``CE + server_kd_weight * KD(z_s, z_c)`` (Eq. 4 / Algorithm 1: for each server epoch, the
clients in random order, each client's features in random batches), then computes
``z_s = f_s(H^(k))`` for each client and sends client k its own rows
(:class:`GKTLogits`, via ``client_targets``), aligned with its private sample order. KD
is fedkd's soft-target KL at ``temperature``, ``T^2 KL(softmax(t/T) || softmax(s/T))``.

The feature is ``features(model, x)[feature]`` flattened to ``[n, D]``: ``"embedding"``
by default (the classifier's input). It is chosen because every built-in student has one
(mlp and logreg have no stages), it is the smallest per-sample representation to upload,
and one vector width makes the server model a plain MLP (fedkd's registered ``mlp``,
``server_hidden`` x ``server_layers``, applied to ``(D,)`` inputs). A stage map
(``feature = "stage2"``) works too; it is flattened, so the server MLP sees ``C * L``.
Every client's feature must have the same flattened width: checked before the run
where the input shape is known from the config, else when the server is set up, and on
every arriving payload.

How the client aligns targets with rows: it trains with
``node.train_private(step=GKTStep(...))``; the loop gives each batch's row indices into
the private data as ``main.rows``, and :class:`GKTStep` looks up the server's logits by
row. Augmentation, the rate schedule and clipping are the loop's.

Deviations:

- Features are the embedding vector by default, and the server model is an MLP over it;
  the paper splits ResNets (ResNet-8 on clients, ResNet-55/109 on the server) and
  transfers convolutional feature maps.
- The paper's server also receives the clients' *test-set* features to evaluate the
  server model (client extractor + server model); here nothing beyond private training
  samples leaves a client, so the server reports only its training metrics on features
  (``train_accuracy``, ``ce``, ``kd``) and fedkd evaluates each client's own small model,
  as usual.
- After training, the server recomputes ``z_s`` for every client whose features it holds
  (the newest server model on each client's latest features), so under client sampling a
  client gets logits of the current server model on its last upload.
- Weights: client ``CE + kd_weight * KD``, server ``CE + server_kd_weight * KD`` (paper:
  weight 1 on each, the defaults here); temperature 3 by default; the ``T^2`` factor is
  fedkd's soft-target convention. Optimizers, batch sizes, epochs: ``[clients]`` and
  ``[server]`` (``server.epochs`` unless ``server_epochs`` is set); the server loop uses
  ``server.lr`` as a constant rate (no ``[server]`` schedule, clipping or augmentation).
- Refused under any active privacy mechanism (DP-SGD, client_gaussian, plug-ins): the
  features, logits and labels of private samples leave the client in the clear, and the
  client loss is a custom step that DP-SGD cannot clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.config import Config, ConfigError, Spec
from fedkd.kd import Batch
from fedkd.kd.step import StepLoss
from fedkd.losses import SoftKL
from fedkd.models import FeatureError, build_model, features
from fedkd.payloads import PAYLOADS, Payload, PayloadError
from fedkd.privacy import mechanism_of
from fedkd.seeding import derive_seed
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
    check_finite,
    make_params,
)
from strategies.fedproto import check_widths, known_input_shape

STATE_KEY = "fedgkt"  # server.state: model, optimizer, dim, features and logits per client


# --- payloads ---------------------------------------------------------------------------


@PAYLOADS.register("gkt_features")
@dataclass(frozen=True)
class GKTFeatures(Payload):
    """Client -> server: per private sample (in the client's order) its extracted feature,
    the client's logits and the label. No indices travel."""

    features: np.ndarray  # (n, D) float32
    logits: np.ndarray  # (n, classes) float32
    labels: np.ndarray  # (n,) int64
    kind: ClassVar[str] = "gkt_features"

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        if self.features.ndim != 2:
            raise PayloadError(f"features have shape {self.features.shape}, expected (n, D)")
        n = len(self.features)
        if self.logits.shape != (n, num_classes):
            raise PayloadError(
                f"logits have shape {self.logits.shape}, expected ({n}, {num_classes})"
            )
        if self.labels.shape != (n,) or not np.issubdtype(self.labels.dtype, np.integer):
            raise PayloadError(
                f"labels must be {n} integers, got {self.labels.dtype}{self.labels.shape}"
            )
        if n and not 0 <= self.labels.min() <= self.labels.max() < num_classes:
            raise PayloadError(f"labels must lie in 0..{num_classes - 1}")
        check_finite("features", self.features)
        check_finite("logits", self.logits)


@PAYLOADS.register("gkt_logits")
@dataclass(frozen=True)
class GKTLogits(Payload):
    """Server -> client: the server model's logits on that client's features, one row per
    private sample in the client's order."""

    logits: np.ndarray  # (n, classes) float32
    kind: ClassVar[str] = "gkt_logits"

    def validate(self, *, num_classes: int, public_idx: np.ndarray | None = None) -> None:
        if self.logits.ndim != 2 or self.logits.shape[1] != num_classes:
            raise PayloadError(
                f"logits have shape {self.logits.shape}, expected (n, {num_classes})"
            )
        check_finite("logits", self.logits)


# --- parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class FedGKTParams:
    kd_weight: float = 1.0  # client: CE + kd_weight * KD(z_c, z_s)
    server_kd_weight: float = 1.0  # server: CE + server_kd_weight * KD(z_s, z_c)
    temperature: float = 3.0  # of both KD terms
    feature: str = "embedding"  # the features() key clients upload (flattened)
    server_hidden: int = 256  # width of the server MLP's hidden layers
    server_layers: int = 3  # hidden layers of the server MLP
    server_epochs: int = 0  # passes over the round's features (0: server.epochs)

    def __post_init__(self) -> None:
        for name in ("kd_weight", "server_kd_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not self.feature or self.feature == "logits":
            raise ConfigError(
                "feature", f"must name a feature other than logits, got {self.feature!r}"
            )
        if self.server_hidden < 1 or self.server_layers < 0 or self.server_epochs < 0:
            raise ConfigError(
                "server_hidden",
                "server_hidden must be >= 1, server_layers and server_epochs >= 0",
            )


# --- client -----------------------------------------------------------------------------


class GKTStep(StepLoss):
    """The client loss: ``CE(z_c, y) + kd_weight * T^2 KL(softmax(z_s/T) || softmax(z_c/T))``
    per private row; the server's ``targets`` (None: CE alone) are looked up by the
    batch's row indices (``main.rows``)."""

    needs = frozenset({"student.logits", "labels"})

    def __init__(
        self,
        targets: Tensor | None,
        kd_weight: float,
        temperature: float,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.targets = targets
        self.kd_weight, self.smoothing = kd_weight, label_smoothing
        self.kl = SoftKL(temperature)

    def forward(self, main: Batch, paired: Batch | None) -> Tensor:
        labels = main.require_labels("fedgkt")
        logits = main.student_feature("fedgkt", "logits")
        ce = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        self.terms = {"ce": float(ce.detach())}
        if self.targets is None or self.kd_weight == 0:
            return ce
        if main.rows is None:
            raise ValueError("fedgkt: the batch has no row indices to align the server's logits")
        kd = self.kl(logits, self.targets[main.rows])
        self.terms["kd"] = float(kd.detach())
        return ce + self.kd_weight * kd


@torch.no_grad()
def extract(model: nn.Module, x: Tensor, key: str, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """``(features[key] flattened to [n, D], logits)`` of ``model`` on ``x`` in eval mode
    (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outs = [features(model, part) for part in x.split(chunk)]
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("no private samples to extract features from")
    if key not in outs[0]:
        raise FeatureError(f"the student has no feature {key!r} (it has {', '.join(outs[0])})")
    feats = torch.cat([o[key].flatten(1) for o in outs]).float()
    return feats, torch.cat([o["logits"] for o in outs]).float()


@CLIENT_STRATEGIES.register("fedgkt")
class FedGKTClient(ClientStrategy):
    """Trains on private data with CE + KD to the server's logits on its own samples;
    uploads features, logits and labels of every private sample."""

    Params = FedGKTParams
    own_loss = "CE + kd_weight * KD to the server's logits"

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        n = node.num_examples
        teacher = None
        if isinstance(targets, GKTLogits):
            if len(targets.logits) != n:
                raise PayloadError(
                    f"server logits for {len(targets.logits)} samples, this client has {n}"
                )
            teacher = torch.as_tensor(targets.logits, dtype=torch.float32, device=node.device)
        p = self.params
        step = GKTStep(teacher, p.kd_weight, p.temperature, node.recipe.label_smoothing)
        return node.train_private(step=step)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        feats, logits = extract(node.model, node.x, self.params.feature)
        return GKTFeatures(
            feats.cpu().numpy(), logits.cpu().numpy(), node.y.cpu().numpy().astype(np.int64)
        )


# --- width check ------------------------------------------------------------------------


def _width_check(key: str) -> dict[str, str]:
    """fedproto's width check, for the feature FedGKT uploads."""
    why = (
        f"trains one server model on every client's {key!r}, so the features must have "
        "the same width"
    )
    return {"key": key, "strategy": "fedgkt", "why": why}


# --- server -----------------------------------------------------------------------------


def train_server(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: dict[int, GKTFeatures],
    *,
    epochs: int,
    batch_size: int,
    kd_weight: float,
    temperature: float,
    generator: torch.Generator,
    device: torch.device,
) -> Metrics:
    """Algorithm 1's server training: per epoch, the clients in random order, each one's
    features in random batches, loss ``CE + kd_weight * KD(z_s, z_c)``."""
    kl = SoftKL(temperature)
    tensors = {
        cid: (
            torch.as_tensor(p.features, dtype=torch.float32, device=device),
            torch.as_tensor(p.logits, dtype=torch.float32, device=device),
            torch.as_tensor(p.labels, dtype=torch.long, device=device),
        )
        for cid, p in data.items()
    }
    cids = list(tensors)
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    steps = correct = seen = 0
    for _ in range(epochs):
        for i in torch.randperm(len(cids), generator=generator).tolist():
            h, z_c, y = tensors[cids[i]]
            for rows in torch.randperm(len(y), generator=generator).split(batch_size):
                rows = rows.to(device)
                out = model(h[rows])
                ce = F.cross_entropy(out, y[rows])
                kd = kl(out, z_c[rows])
                loss = ce + kd_weight * kd
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums["loss"] += float(loss.detach())
                sums["ce"] += float(ce.detach())
                sums["kd"] += float(kd.detach())
                correct += int((out.argmax(1) == y[rows]).sum())
                seen += len(rows)
                steps += 1
    out_metrics = {k: v / max(steps, 1) for k, v in sums.items()}
    out_metrics["train_accuracy"] = correct / max(seen, 1)
    return out_metrics


@torch.no_grad()
def server_logits(model: nn.Module, feats: np.ndarray, device: torch.device) -> np.ndarray:
    """``model``'s logits on ``feats`` ([n, D]) in eval mode, float32, in row order."""
    was_training = model.training
    model.eval()
    try:
        h = torch.as_tensor(feats, dtype=torch.float32, device=device)
        out = torch.cat([model(part) for part in h.split(1024)]) if len(h) else model(h)
    finally:
        model.train(was_training)
    return out.cpu().numpy().astype(np.float32)


@SERVER_STRATEGIES.register("fedgkt")
class FedGKTServer(ServerStrategy):
    """Trains a server MLP on the clients' features (CE + KD to their logits) and sends
    each client the server's logits on its own samples."""

    Params = FedGKTParams
    client_strategy = FedGKTClient
    uses_teacher = False
    clients_use_public = False
    accepts = (GKTFeatures,)

    @classmethod
    def check_config(cls, config: Config) -> None:
        """No privacy mechanism and one feature width (where the input shape is known
        now); a ``strategy.losses`` list is refused through ``FedGKTClient.own_loss``."""
        if mechanism_of(config).active:
            raise ConfigError(
                "privacy.mechanism",
                f"fedgkt cannot run under {config.privacy.mechanism!r}: clients upload the "
                "features, logits and labels of their private samples in the clear, and train "
                "with a custom loss outside any private training; use mechanism = 'none'",
            )
        shape = known_input_shape(config)
        if shape is None:
            return  # checked in setup, once the data is built
        key = cls._params(config).feature
        try:
            check_widths(config, shape, **_width_check(key))
        except ConfigError:
            raise
        except Exception:  # a model unfit for these inputs: fedkd reports it
            return

    @classmethod
    def _params(cls, config: Config) -> FedGKTParams:
        return make_params(cls.Params, dict(config.strategy.params), "strategy")

    def setup(self, server: ServerNode) -> None:
        shape = tuple(server.test_x.shape[1:])
        p = self.params
        dim = check_widths(server.config, shape, server.num_classes, **_width_check(p.feature))
        spec = Spec("mlp", {"hidden": p.server_hidden, "layers": p.server_layers})
        seed = derive_seed(server.config.seed, "fedgkt-server")
        model = build_model(spec, (dim,), server.num_classes, seed=seed).to(server.device)
        server.state[STATE_KEY] = {
            "dim": dim,
            "model": model,
            "optimizer": server.make_optimizer(model),
            "features": {},  # cid -> the client's latest GKTFeatures
            "logits": {},  # cid -> the server's logits on them, (n, classes)
        }

    def check_payload(self, server: ServerNode, cid: int, payload: Payload) -> None:
        assert isinstance(payload, GKTFeatures)
        dim = server.state.get(STATE_KEY, {}).get("dim")
        if dim is not None and payload.features.shape[1] != dim:
            raise PayloadError(
                f"features of width {payload.features.shape[1]}, expected {dim} (the width "
                "the server model takes)"
            )
        n = server.num_examples.get(cid)
        if n is not None and len(payload.labels) != n:
            raise PayloadError(f"{len(payload.labels)} rows, the client has {n} samples")

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        """Keeps each client's features; returns this round's rows concatenated."""
        received = {c: p for c, p in payloads.items() if isinstance(p, GKTFeatures)}
        if not received:
            return None
        st = server.state[STATE_KEY]
        st["features"].update(received)
        st["fresh"] = sorted(received)
        parts = list(received.values())
        return GKTFeatures(
            np.concatenate([p.features for p in parts]),
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        """Train the server model on this round's features, then recompute its logits on
        every client's latest features."""
        st, p = server.state[STATE_KEY], self.params
        fresh = {cid: st["features"][cid] for cid in st.get("fresh", [])}
        metrics = train_server(
            st["model"],
            st["optimizer"],
            fresh,
            epochs=p.server_epochs or server.settings.epochs,
            batch_size=server.settings.batch_size,
            kd_weight=p.server_kd_weight,
            temperature=p.temperature,
            generator=server.generator,
            device=server.device,
        )
        for cid, feats in st["features"].items():
            st["logits"][cid] = server_logits(st["model"], feats.features, server.device)
        return metrics

    def evaluate(self, server: ServerNode) -> Metrics:
        return {}  # no test features reach the server (see the module docstring)

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        return None  # per client: client_targets reads server.state

    def client_targets(
        self, server: ServerNode, cid: int, targets: Payload | None
    ) -> Payload | None:
        """The server model's logits on client ``cid``'s own features, in its sample
        order (None before the client's first upload was trained on)."""
        logits = server.state.get(STATE_KEY, {}).get("logits", {}).get(cid)
        return None if logits is None else GKTLogits(logits)
