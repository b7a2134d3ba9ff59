"""Relational KD on public batches (Park et al. 2019), as a user strategy.

Each client minimises, per step, ``(1 - w) * CE`` on its private batch plus, on the
paired public batch, ``w * soft_kl`` to the teacher's logits and ``rkd_weight * RKD``
(the distance term) between its embeddings and the teacher's. The server is fedkd's
``kd``, except that its targets always carry the teacher's embeddings.
Run from this folder: ``strategy.name = "feature_hint_strategy:RelationKD"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from fedkd.kd import Batch, RelationalKD, SoftTargetKL
from fedkd.kd.step import StepLoss
from fedkd.payloads import Logits, Payload
from fedkd.strategy import ClientNode, Metrics, ServerNode
from strategies.kd import KDClient, KDParams, KDServer


@dataclass(frozen=True)
class RelationParams(KDParams):
    rkd_weight: float = 1.0  # weight of the RKD distance term


class RelationStep(StepLoss):
    needs = frozenset({"student.logits", "student.embedding"})  # embedding: run features()

    def __init__(self, p: RelationParams) -> None:
        super().__init__()
        self.p, self.kl = p, SoftTargetKL(p.temperature)
        self.rkd = RelationalKD(angle_weight=0.0)  # distances only; any embedding widths

    def forward(self, main: Batch, paired: Batch | None) -> Tensor:
        ce = F.cross_entropy(main.student["logits"], main.require_labels("ce"))
        self.terms = {"ce": ce.item()}
        if paired is None:  # round 1: no targets yet
            return ce
        kl, rkd = self.kl(paired), self.rkd(paired)
        self.terms.update(soft_kl=kl.item(), rkd=rkd.item())
        w = self.p.kd_weight
        return (1 - w) * ce + w * kl + self.p.rkd_weight * rkd


class RelationClient(KDClient):
    Params = RelationParams

    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = targets if isinstance(targets, Logits) else None
        return node.train_private(kd=kd, step=RelationStep(self.params))


class RelationKD(KDServer):
    Params = RelationParams
    client_strategy = RelationClient

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        if server.teacher_updates == 0:
            return None  # an untrained teacher is no target
        return server.logits(server.teacher, public_idx, embedding=True)  # EmbeddedLogits
