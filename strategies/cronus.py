"""Cronus (Chang et al., 2019, arXiv:1912.11279): robust, heterogeneous collaborative
learning by black-box knowledge transfer through soft labels.

Clients share soft labels (softmax outputs) on the public set, never parameters.
For every public sample the server aggregates the clients' probability vectors
with a robust mean estimator: a spectral filter in the style of Diakonikolas et
al. (2017) which, while the top eigenvalue of the vectors' covariance exceeds
``threshold``, drops the vector with the largest squared projection on the top
eigenvector (at most ``max_outlier_fraction`` of the clients), then averages the
rest. A few poisoned clients can so shift the aggregate only by a bounded amount.
Clients train on their private data mixed with the public set labelled by the
robust aggregate (``kd_weight``).

Deviations: the filter's threshold is a fixed eigenvalue bound instead of one
derived from an assumed honest covariance. Honest non-IID clients often disagree
beyond the default bound, so the filter then drops up to ``max_outlier_fraction``
of the vectors on such samples and acts like a trimmed mean (the per-client
``filtered/<cid>`` shares in the round metrics show how often each client was
dropped). The paper's initial local-only phase is the first round (no targets yet).
Unverified against the paper's text: the exact filter thresholds and the loss on
the public soft labels (KL here, which has the soft cross-entropy's gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.config import ConfigError
from fedkd.payloads import Payload, SoftLabels
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientNode,
    ClientStrategy,
    Metrics,
    ServerNode,
    ServerStrategy,
)
from fedkd.vectorize import train_private_group


@dataclass(frozen=True)
class CronusParams:
    kd_weight: float = 0.5  # weight of the public soft-label term vs private cross-entropy
    threshold: float = 0.05  # covariance eigenvalue bound of the filter
    max_outlier_fraction: float = 0.3  # at most this share of clients dropped per sample

    def __post_init__(self) -> None:
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError("kd_weight", f"must be in [0, 1], got {self.kd_weight}")
        if self.threshold < 0:
            raise ConfigError("threshold", f"must be >= 0, got {self.threshold}")
        if not 0 <= self.max_outlier_fraction < 0.5:
            raise ConfigError(
                "max_outlier_fraction", f"must be in [0, 0.5), got {self.max_outlier_fraction}"
            )


def robust_mean(
    points: np.ndarray, threshold: float, max_outlier_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral-filter mean of ``points`` (samples, clients, dims), per sample.

    Returns the robust means (samples, dims) and the mask of kept points
    (samples, clients).
    """
    x = torch.as_tensor(points, dtype=torch.float64)
    n, k, _ = x.shape
    keep = torch.ones(n, k, dtype=torch.bool)
    rows = torch.arange(n)
    for _ in range(int(max_outlier_fraction * k)):
        w = keep.double().unsqueeze(-1)
        mu = (w * x).sum(1) / w.sum(1)
        centred = (x - mu.unsqueeze(1)) * w
        cov = centred.transpose(1, 2) @ centred / w.sum(1).unsqueeze(-1)
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, :, -1]
        score = ((x - mu.unsqueeze(1)) @ top.unsqueeze(-1)).squeeze(-1) ** 2
        score[~keep] = -1.0
        bad = evals[:, -1] > threshold
        if not bool(bad.any()):
            break
        worst = score.argmax(1)
        keep[rows[bad], worst[bad]] = False
    w = keep.double().unsqueeze(-1)
    return ((w * x).sum(1) / w.sum(1)).numpy(), keep.numpy()


@CLIENT_STRATEGIES.register("cronus")
class CronusClient(ClientStrategy):
    Params = CronusParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = targets if isinstance(targets, SoftLabels) else None
        return node.train_private(kd=kd, kd_weight=self.params.kd_weight)

    def train_group(self, nodes: list[ClientNode], targets: Payload | None) -> list[Metrics]:
        """:meth:`train` vectorised over clients of one architecture (``simulation.vectorize``)."""
        kd = targets if isinstance(targets, SoftLabels) else None
        return train_private_group(nodes, kd=kd, kd_weight=self.params.kd_weight)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return node.public_probs(public_idx)


@SERVER_STRATEGIES.register("cronus")
class CronusServer(ServerStrategy):
    Params = CronusParams
    client_strategy = CronusClient
    uses_teacher = False
    accepts = (SoftLabels,)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        labels = [p for p in payloads.values() if isinstance(p, SoftLabels)]
        stacked = np.stack([p.probs for p in labels], axis=1)  # (samples, clients, classes)
        means, keep = robust_mean(stacked, self.params.threshold, self.params.max_outlier_fraction)
        dropped = 1 - keep.mean(axis=0)
        server.state["dropped"] = {cid: float(d) for cid, d in zip(payloads, dropped, strict=True)}
        probs = means / means.sum(axis=1, keepdims=True)
        return SoftLabels(labels[0].idx.copy(), probs.astype(np.float32))

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        """No server model; reports the share of samples on which each client was filtered."""
        return {f"filtered/{cid}": share for cid, share in server.state["dropped"].items()}
