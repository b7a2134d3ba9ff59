"""In-process transport: the same client code, called directly, one client after another.

No Flower and no Ray. Used for the local-only baseline, for the benchmark's plain
reference loop, and by users who want to debug a strategy in a single process.
Client state goes through the same bytes round-trip as under Flower, so both
transports compute the same numbers.
"""

from __future__ import annotations

import numpy as np

from fedkd.client import ClientRuntime, TrainReply
from fedkd.config import Config
from fedkd.federation import Failure
from fedkd.payloads import Payload
from fedkd.state_store import StateStore


class InlineTransport:
    """Runs each sampled client's round in this process, in client-id order.

    ``store``: where client state lives between rounds (default: this process's memory).
    """

    def __init__(self, config: Config, data_path: str, store: StateStore | None = None) -> None:
        self.runtime = ClientRuntime(config, data_path, store)

    def train(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, TrainReply | Failure]:
        replies: dict[int, TrainReply | Failure] = {}
        for cid, targets in sorted(requests.items()):
            try:
                replies[cid] = self.runtime.train(cid, rnd, targets, public_idx)
            except Exception as err:  # a failing client must not end the run
                replies[cid] = Failure.from_exception(cid, err)
        return replies
