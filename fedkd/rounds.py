"""The server's round loop, independent of how messages reach the clients.

:class:`Federation` runs the strategy hooks round by round over a
:class:`Transport`: Flower's Grid (:mod:`fedkd.flower`) or direct in-process calls
(:mod:`fedkd.inline`). It validates every payload on arrival, counts bytes in both
directions, and hands one record per finished round to a callback (which writes it
to disk at once, so finished rounds survive a crash or Ctrl-C).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedkd.client import FitReply, resolve_device, student_spec
from fedkd.config import Config
from fedkd.data import FederatedData
from fedkd.models import build_model
from fedkd.payloads import Payload, PayloadError
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.privacy.noise import NoiseSource
from fedkd.privacy.payload import central_mean
from fedkd.seeding import derive_seed, torch_generator
from fedkd.strategy import ServerNode, ServerStrategy, server_strategy
from fedkd.training import make_optimizer, to_tensor

log = logging.getLogger("fedkd")


@dataclass
class Failure:
    """A client that sent no usable reply this round, and why."""

    cid: int
    error: str


class Transport(Protocol):
    """Delivers a round's request to clients and collects their replies."""

    def fit(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, FitReply | Failure]:
        """Run round ``rnd`` on each client in ``requests`` (client id -> its targets)."""
        ...


RoundCallback = Callable[[dict[str, Any]], None]


def public_indices(config: Config, rnd: int) -> np.ndarray:
    """Public samples used in round ``rnd``: all, or a seeded subset of ``server.public_subset``."""
    n, k = config.data.public, config.server.public_subset
    if k == 0 or k >= n:  # int32: what travels, and public sets stay below 2**31 samples
        return np.arange(n, dtype=np.int32)
    rng = np.random.default_rng(derive_seed(config.seed, "public", rnd))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int32)


def sample_clients(config: Config, rnd: int) -> list[int]:
    """Clients sampled in round ``rnd`` (``clients.fraction`` of them, seeded)."""
    n = config.clients.count
    k = max(1, round(config.clients.fraction * n))
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(config.seed, "sample", rnd))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


class Federation:
    """Server state and round loop for one experiment."""

    def __init__(self, config: Config, data: FederatedData, strategy: ServerStrategy | None = None):
        self.config = config
        self.data = data
        self.strategy = strategy or server_strategy(config)
        teacher = optimizer = None
        device = resolve_device(config)
        if self.strategy.uses_teacher:
            teacher = build_model(
                config.server.teacher,
                data.input_shape,
                data.num_classes,
                seed=derive_seed(config.seed, "teacher"),
            ).to(device)
            optimizer = make_optimizer(config.server.optimizer, teacher, config.server.lr)
        self.server = ServerNode(
            round=0,
            teacher=teacher,
            optimizer=optimizer,
            public_x=to_tensor(data.public_x, device),
            test_x=to_tensor(data.test_x, device),
            test_y=to_tensor(data.test_y, device),
            num_classes=data.num_classes,
            config=config,
            generator=torch_generator(config.seed, "server", 0),
            device=device,
            privacy=PrivacyLedger(config, data.part_sizes),
        )
        self.noise = NoiseSource(config.seed, config.privacy.secure_noise)
        self.stopped: str | None = None  # why the run ended early (privacy budget)

    def _check(self, reply: FitReply, public_idx: np.ndarray) -> str | None:
        """Why this reply's payload cannot be aggregated (None: it can)."""
        payload = reply.payload
        if payload is None:
            return None
        accepts = self.strategy.accepts
        if not isinstance(payload, accepts):
            names = ", ".join(getattr(t, "kind", t.__name__) for t in accepts)
            return f"strategy {self.config.strategy.name!r} accepts {names}, got {payload.kind}"
        try:
            payload.validate(num_classes=self.data.num_classes, public_idx=public_idx)
            self.strategy.check_payload(self.server, reply.cid, payload)
        except PayloadError as err:
            return f"invalid {payload.kind} payload: {err}"
        return None

    def _sample(self, rnd: int) -> list[int]:
        count = self.config.clients.count
        cids = [
            int(c) if isinstance(c, (int, np.integer)) else c
            for c in self.strategy.sample(self.server, count)
        ]
        bad = [c for c in cids if not (isinstance(c, int) and 0 <= c < count)]
        if bad or len(set(cids)) != len(cids) or not cids:
            raise RuntimeError(
                f"round {rnd}: {type(self.strategy).__name__}.sample returned {cids}; "
                f"expected distinct client ids in 0..{count - 1}"
            )
        return sorted(cids)

    def run(self, transport: Transport, on_round: RoundCallback | None = None) -> list[dict]:
        """Run all rounds; returns the per-round records (also passed to ``on_round``)."""
        cfg, strategy, server = self.config, self.strategy, self.server
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.simulation.threads)
        try:
            strategy.setup(server)
            records = []
            targets: Payload | None = None
            idx = public_indices(cfg, 1)
            for rnd in range(1, cfg.rounds + 1):
                start = time.perf_counter()
                server.round = rnd
                server.public_idx = idx
                server.generator = torch_generator(cfg.seed, "server", rnd)
                torch.manual_seed(derive_seed(cfg.seed, "server-global", rnd))
                cids = self._sample(rnd)
                assert server.privacy is not None
                reason = server.privacy.stop_reason(rnd, cids)
                if reason is not None:
                    log.warning("stopping before round %d: %s", rnd, reason)
                    self.stopped = reason
                    break
                requests = {cid: strategy.client_targets(server, cid, targets) for cid in cids}
                query = idx if strategy.clients_use_public else idx[:0]
                # the round's public indices are a seeded function of (seed, round) that both
                # sides can compute: they travel here for validation but are not counted
                down = {cid: req.nbytes if req is not None else 0 for cid, req in requests.items()}
                replies = transport.fit(rnd, requests, query)
                clients: dict[str, dict[str, Any]] = {}
                failures, payloads = [], {}
                replied: dict[int, dict[str, float]] = {}
                for cid in cids:
                    reply = replies.get(cid, Failure(cid, "no reply"))
                    up = 0
                    if isinstance(reply, FitReply):
                        up = reply.payload.nbytes if reply.payload is not None else 0
                        server.num_examples[cid] = int(reply.metrics["num_examples"])
                        replied[cid] = reply.metrics  # charged for privacy even if rejected
                    problem = (
                        reply.error if isinstance(reply, Failure) else self._check(reply, query)
                    )
                    if problem is not None:
                        log.warning("round %d: client %d failed: %s", rnd, cid, problem)
                        failures.append(
                            {
                                "client": cid,
                                "error": problem,
                                "bytes_up": up,
                                "bytes_down": down[cid],
                            }
                        )
                        continue
                    if reply.payload is not None:
                        payloads[cid] = reply.payload
                    clients[str(cid)] = {
                        "model": str(student_spec(cfg, cid)),
                        **reply.metrics,
                        "bytes_up": up,
                        "bytes_down": down[cid],
                    }
                privacy = cfg.privacy
                if (
                    payloads
                    and privacy.mechanism == "client_gaussian"
                    and privacy.mode == "central"
                ):
                    # the strategy sees one payload: the noisy mean of the clipped payloads
                    noisy = central_mean(
                        payloads,
                        privacy.clip,
                        privacy.noise_multiplier,
                        self.noise,
                        rnd,
                        sampled=len(cids),
                    )
                    payloads = {-1: noisy}
                aggregate = strategy.aggregate(server, payloads) if payloads else None
                server_metrics: dict[str, float] = {}
                if aggregate is not None:
                    server_metrics.update(strategy.distill(server, aggregate))
                server_metrics.update(strategy.evaluate(server))
                next_idx = public_indices(cfg, rnd + 1)
                targets = strategy.targets(server, aggregate, next_idx)
                server.privacy.charge(cids, replied)
                accs = [c["accuracy"] for c in clients.values()]
                record = {
                    "round": rnd,
                    "seconds": time.perf_counter() - start,
                    "teacher": server_metrics or None,
                    "students": {
                        "mean": float(np.mean(accs)) if accs else None,
                        "min": float(np.min(accs)) if accs else None,
                        "max": float(np.max(accs)) if accs else None,
                        "count": len(accs),
                    },
                    "bytes_up": int(  # rejected payloads travelled too
                        sum(c["bytes_up"] for c in [*clients.values(), *failures])
                    ),
                    "bytes_down": int(sum(down.values())),
                    "clients": clients,
                    "failures": failures,
                    "privacy": server.privacy.record(),
                }
                idx = next_idx
                records.append(record)
                if on_round is not None:
                    on_round(record)
            return records
        finally:
            torch.set_num_threads(threads)
