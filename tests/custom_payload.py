"""A user-defined payload kind and the strategies that use it, loaded by import path.

Clients send hard votes (their argmax on the public samples) as int16; the server
takes the plurality vote per sample and sends it back, also as votes, so the
custom kind is decoded on both sides (a fresh Ray worker included).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedkd.payloads import PAYLOADS, Payload, SoftLabels
from fedkd.payloads import Votes as BuiltinVotes
from fedkd.strategy import ClientNode, ClientStrategy, Metrics, ServerNode, ServerStrategy


@PAYLOADS.register("test_votes")
class Votes(BuiltinVotes):
    """The built-in votes' arrays and checks under a kind only this module registers:
    a worker can decode it only after importing the user's module."""

    kind: ClassVar[str] = "test_votes"


class VoteClient(ClientStrategy):
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        kd = None
        if isinstance(targets, Votes) and node.round > 1:  # round 1: placeholder votes
            one_hot = np.eye(node.num_classes, dtype=np.float32)[targets.labels]
            kd = SoftLabels(targets.idx, one_hot)
        return node.train_private(kd=kd, kd_weight=0.3)

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        labels = node.public_logits(public_idx).argmax(1).astype(np.int16)
        return Votes(np.asarray(public_idx), labels)


class PluralityServer(ServerStrategy):
    client_strategy = VoteClient
    uses_teacher = False
    accepts = (Votes,)

    def client_targets(self, server: ServerNode, cid: int, targets: Payload | None) -> Payload:
        """Votes already in round 1, so a fresh worker must decode the custom kind."""
        if targets is None:
            idx = server.public_idx
            return Votes(idx, np.zeros(len(idx), np.int16))
        return targets

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        votes = [p for p in payloads.values() if isinstance(p, Votes)]
        counts = np.zeros((len(votes[0].idx), server.num_classes))
        for v in votes:
            counts[np.arange(len(v.labels)), v.labels] += 1
        return Votes(votes[0].idx, counts.argmax(1).astype(np.int16))
