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
from fedkd.federation import Failure, by_targets
from fedkd.payloads import Payload
from fedkd.state_store import StateStore


class InlineTransport:
    """Runs each sampled client's round in this process, in client-id order (with
    ``simulation.vectorize``, clients that get the same targets and share a strategy that
    trains in groups are trained together, as one worker under Flower would).

    ``store``: where client state lives between rounds (default: this process's memory).
    """

    def __init__(self, config: Config, data_path: str, store: StateStore | None = None) -> None:
        self.runtime = ClientRuntime(config, data_path, store)

    def train(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, TrainReply | Failure]:
        together = self.runtime.config.simulation.vectorize
        replies: dict[int, TrainReply | Failure] = {}
        for targets, cids in by_targets(dict(sorted(requests.items()))):
            done = self.runtime.train_many(cids, rnd, targets, public_idx, together=together)
            for cid, reply in done.items():  # a failing client does not end the run
                failed = isinstance(reply, Exception)
                replies[cid] = Failure.from_exception(cid, reply) if failed else reply
        return dict(sorted(replies.items()))
