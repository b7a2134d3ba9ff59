"""In-process transport: the same client code, called directly, one client after another.

No Flower and no Ray. Used for the local-only baseline, for the benchmark's plain
reference loop, and by users who want to debug a strategy in a single process.
Client state goes through the same bytes round-trip as under Flower, so both
transports compute the same numbers.
"""

from __future__ import annotations

import traceback

import numpy as np

from fedkd.client import ClientRuntime, FitReply
from fedkd.config import Config
from fedkd.payloads import Payload
from fedkd.rounds import Failure


class InlineTransport:
    """Runs each sampled client's round in this process, in client-id order."""

    def __init__(self, config: Config, data_path: str) -> None:
        self.runtime = ClientRuntime(config, data_path)
        self.states: dict[int, bytes] = {}

    def fit(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, FitReply | Failure]:
        replies: dict[int, FitReply | Failure] = {}
        for cid, targets in sorted(requests.items()):
            try:
                reply, self.states[cid] = self.runtime.fit(
                    cid, rnd, self.states.get(cid), targets, public_idx
                )
                replies[cid] = reply
            except Exception as err:  # a failing client must not end the run
                detail = traceback.format_exception_only(type(err), err)[-1].strip()
                replies[cid] = Failure(cid, detail)
        return replies
