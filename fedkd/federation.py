"""The server's round loop, independent of how messages reach the clients.

:class:`Federation` runs the strategy hooks round by round over a
:class:`Transport`: Flower's Grid (:mod:`fedkd.flower`) or direct in-process calls
(:mod:`fedkd.inline`). It validates every payload on arrival, counts bytes in both
directions, applies simulated faults (``[faults]``), decides whether a round
failed (``clients.min_success``), and hands one :class:`RoundRecord` per finished
round to a callback, which writes it and a checkpoint to disk at once, so finished
rounds survive a crash, a kill or Ctrl-C, and ``fedkd resume`` can continue.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedkd.assignment import resolve_device, student_spec
from fedkd.client import TargetsError, TrainReply
from fedkd.config import Config
from fedkd.contracts import check_metrics, check_payload, min_usable, one_line
from fedkd.data import FederatedData
from fedkd.data.transforms import train_augment
from fedkd.faults import RoundFaults, byzantine_clients, plan_round
from fedkd.models import build_model
from fedkd.payloads import Payload, PayloadError
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.privacy.mechanism import Mechanism
from fedkd.privacy.noise import NoiseSource
from fedkd.results.records import (
    ClientRecord,
    FailureRecord,
    RoundRecord,
)
from fedkd.seeding import derive_seed, seed_torch, torch_generator
from fedkd.selection import server_strategy, teacher_reads
from fedkd.server_node import ServerNode
from fedkd.strategy import ServerStrategy
from fedkd.training import make_optimizer, to_tensor

log = logging.getLogger("fedkd")


@dataclass
class Failure:
    """A client that sent no usable reply this round: one line of why, who caused it
    (``client`` or ``server``), and the full traceback where there is one."""

    cid: int
    error: str
    side: str = "client"
    traceback: str | None = None
    metrics: dict[str, float] | None = None  # what a client reported along an unusable payload

    @classmethod
    def from_exception(cls, cid: int, err: BaseException) -> Failure:
        """A failure from an exception raised while running client ``cid``'s round."""
        side = "server" if isinstance(err, TargetsError) else "client"
        return cls(cid, one_line(err), side, "".join(traceback.format_exception(err)))


class RunFailed(RuntimeError):
    """The run cannot go on: a round had too few usable replies, or the server side raised."""


class Interrupted(Exception):
    """A stop was requested (Ctrl-C): the loop ends between rounds or while waiting."""


def by_targets(requests: dict[int, Payload | None]) -> list[tuple[Payload | None, list[int]]]:
    """A round's requested clients grouped by the targets object each gets (first-seen
    order): clients of a group may share one message, or train together."""
    groups: dict[int, tuple[Payload | None, list[int]]] = {}
    for cid, targets in requests.items():
        groups.setdefault(id(targets), (targets, []))[1].append(cid)
    return list(groups.values())


class Transport(Protocol):
    """Delivers a round's request to clients and collects their replies."""

    def train(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, TrainReply | Failure]:
        """Run round ``rnd`` on each client in ``requests`` (client id -> its targets)."""
        ...


class StopSignal(Protocol):
    """Anything with ``is_set()``, e.g. a ``threading.Event`` that Ctrl-C sets."""

    def is_set(self) -> bool: ...


RoundCallback = Callable[[RoundRecord], None]
ErrorLog = Callable[[str, str, "str | None"], None]  # (where, one line, traceback)


def public_indices(config: Config, rnd: int) -> np.ndarray:
    """Public samples used in round ``rnd``: all, or a seeded subset of ``server.public_subset``."""
    n, k = config.data.public, config.server.public_subset
    if k == 0 or k >= n:  # int32: what travels, and public sets stay below 2**31 samples
        return np.arange(n, dtype=np.int32)
    rng = np.random.default_rng(derive_seed(config.seed, "public", rnd))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int32)


class Federation:
    """Server state and round loop for one experiment.

    The state that :mod:`fedkd.checkpoint` saves after each round: the server node
    (teacher, optimizer, strategy state, privacy ledger, counters), the strategy
    object, the targets for the next round and the round records so far.
    """

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
            augment=train_augment(config.data),
            clients_read=teacher_reads(config),
        )
        self.noise = NoiseSource(config.seed, config.privacy.secure_noise)
        self.byzantine = frozenset(byzantine_clients(config))
        self.stopped: str | None = None  # why the run ended early (privacy budget)
        self.records: list[RoundRecord] = []
        self.targets: Payload | None = None  # sent with the next round
        self.started = False  # strategy.setup has run (a resumed run does not redo it)

    @property
    def mechanism(self) -> Mechanism:
        """The privacy mechanism in force: the ledger's (restored with a checkpoint)."""
        assert self.server.privacy is not None
        return self.server.privacy.plugin

    @property
    def next_round(self) -> int:
        return len(self.records) + 1

    # --- hooks, with their contracts checked ---------------------------------------------

    def _hook(self, name: str, *args: Any) -> Any:
        """Call server strategy hook ``name``; an exception becomes one line naming it."""
        try:
            return getattr(self.strategy, name)(self.server, *args)
        except (RunFailed, Interrupted):
            raise
        except Exception as err:
            who = f"{type(self.strategy).__name__}.{name}"
            raise RunFailed(f"server: {who} raised {one_line(err)}") from err

    def _check(self, reply: TrainReply, public_idx: np.ndarray) -> str | None:
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
            if not self.mechanism.hides_payloads:  # e.g. central DP: it sees the noisy mean
                self.strategy.check_payload(self.server, reply.cid, payload)
        except PayloadError as err:
            return f"invalid {payload.kind} payload: {err}"
        return None

    def _query(self, rnd: int, idx: np.ndarray) -> np.ndarray:
        """The public indices sent to clients this round (``public_query``), checked to be
        a 1-D integer array drawn from the round's subset ``idx``."""
        query = np.asarray(self._hook("public_query", idx))
        if query.size == 0:
            return idx[:0]
        if query.ndim != 1 or query.dtype.kind not in "iu" or not np.isin(query, idx).all():
            raise RunFailed(
                f"server: round {rnd}: {type(self.strategy).__name__}.public_query returned "
                f"{query.dtype} of shape {query.shape}; expected a 1-D array of indices from "
                "the round's public subset (the public_idx it was given)"
            )
        return query.astype(idx.dtype)

    def _sample(self, rnd: int) -> list[int]:
        count = self.config.clients.count
        cids = [
            int(c) if isinstance(c, int | np.integer) else c for c in self._hook("sample", count)
        ]
        bad = [c for c in cids if not (isinstance(c, int) and 0 <= c < count)]
        if bad or len(set(cids)) != len(cids) or not cids:
            raise RunFailed(
                f"server: round {rnd}: {type(self.strategy).__name__}.sample returned {cids}; "
                f"expected distinct client ids in 0..{count - 1}"
            )
        return sorted(cids)

    # --- the loop ------------------------------------------------------------------------

    def run(
        self,
        transport: Transport,
        on_round: RoundCallback | None = None,
        *,
        stop: StopSignal | None = None,
        errors: ErrorLog | None = None,
    ) -> list[RoundRecord]:
        """Run the remaining rounds; returns every round's record (also passed to
        ``on_round`` as each ends). Raises :class:`RunFailed` after a failed round
        (its record is passed on first) and :class:`Interrupted` when ``stop`` is set."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.simulation.threads)
        try:
            if not self.started:
                self._hook("setup")
                self.started = True
            for rnd in range(self.next_round, self.config.rounds + 1):
                if stop is not None and stop.is_set():
                    raise Interrupted(f"stopped before round {rnd}")
                record = self.run_round(rnd, transport, errors)
                if record is None:
                    break
                self.records.append(record)
                if on_round is not None:
                    on_round(record)
                if record.failed:
                    raise RunFailed(self.failed_reason(record))
            return self.records
        finally:
            torch.set_num_threads(threads)

    def failed_reason(self, record: RoundRecord) -> str:
        need = min_usable(self.config.clients.min_success, len(record.sampled))
        why = f"; first: {record.failures[0].describe()}" if record.failures else ""
        f = record.faults
        if f is not None and (f.dropped or f.late):
            why += f" ({len(f.dropped)} dropped, {len(f.late)} late: simulated faults)"
        return (
            f"round {record.round}: {record.usable} of {len(record.sampled)} sampled clients "
            f"replied usably, below clients.min_success = {self.config.clients.min_success:g} "
            f"(needs {need}){why}"
        )

    def run_round(
        self, rnd: int, transport: Transport, errors: ErrorLog | None = None
    ) -> RoundRecord | None:
        """One round; None when the privacy budget does not allow it (``self.stopped``)."""
        cfg, server = self.config, self.server
        start = time.perf_counter()
        server.round = rnd
        idx = public_indices(cfg, rnd)
        server.public_idx = idx
        server.generator = torch_generator(cfg.seed, "server", rnd)
        server.augment_generator = torch_generator(cfg.seed, "server-augment", rnd)
        seed_torch(derive_seed(cfg.seed, "server-global", rnd))
        cids = self._sample(rnd)
        assert server.privacy is not None
        reason = server.privacy.stop_reason(rnd, cids)
        if reason is not None:
            log.warning("stopping before round %d: %s", rnd, reason)
            self.stopped = reason
            return None
        query = self._query(rnd, idx)
        faults = plan_round(cfg, rnd, cids)
        requests = {
            cid: check_payload(
                self.strategy, "client_targets", self._hook("client_targets", cid, self.targets)
            )
            for cid in cids
            if cid not in faults.dropped
        }
        # the round's public indices are a seeded function of (seed, round) that both
        # sides can compute: they travel here for validation but are not counted
        down = {cid: req.nbytes if req is not None else 0 for cid, req in requests.items()}
        replies = transport.train(rnd, requests, query) if requests else {}
        clients, failures, payloads, replied = self._collect(
            rnd, cids, faults, replies, down, query, errors
        )
        server.privacy.charge(cids, replied)  # before the server's hooks, which may raise
        server_metrics = self._aggregate(rnd, cids, payloads)
        usable = len(clients)
        record = RoundRecord(
            round=rnd,
            seconds=time.perf_counter() - start,
            sampled=tuple(cids),
            clients=clients,
            failures=tuple(failures),
            server=server_metrics or None,
            bytes_up=int(sum(c.bytes_up for c in clients.values()))
            + int(sum(f.bytes_up for f in failures)),  # rejected payloads travelled too
            bytes_down=int(sum(down.values())),
            privacy=server.privacy.record(),
            faults=faults if self._faults_on() else None,
            failed=usable < min_usable(cfg.clients.min_success, len(cids)),
        )
        return record

    def _faults_on(self) -> bool:
        f = self.config.faults
        return bool(f.dropout or f.stragglers or self.byzantine)

    def _collect(
        self,
        rnd: int,
        cids: list[int],
        faults: RoundFaults,
        replies: dict[int, TrainReply | Failure],
        down: dict[int, int],
        query: np.ndarray,
        errors: ErrorLog | None,
    ) -> tuple[dict[int, ClientRecord], list[FailureRecord], dict[int, Payload], dict]:
        """Sort the replies into usable ones, failures and simulated drops."""
        clients: dict[int, ClientRecord] = {}
        failures: list[FailureRecord] = []
        payloads: dict[int, Payload] = {}
        replied: dict[int, dict[str, float]] = {}  # charged for privacy even if rejected
        for cid in cids:
            if cid in faults.dropped:
                continue  # simulated dropout: no message was sent (recorded under faults)
            reply = replies.get(cid, Failure(cid, "no reply"))
            up = 0
            if isinstance(reply, Failure) and reply.metrics is not None:
                replied[cid] = reply.metrics  # it released something: charge it
            if isinstance(reply, TrainReply):
                up = reply.payload.nbytes if reply.payload is not None else 0
                self.server.num_examples[cid] = int(reply.metrics["num_examples"])
                replied[cid] = reply.metrics
                if cid in faults.late:
                    continue  # simulated straggler past the deadline: its reply is dropped
            problem = reply if isinstance(reply, Failure) else None
            if problem is None:
                why = self._check(reply, query)
                problem = None if why is None else Failure(cid, why)
            if problem is not None:
                log.info("round %d: %s %d failed: %s", rnd, problem.side, cid, problem.error)
                if errors is not None:
                    side = " (the server's fault)" if problem.side == "server" else ""
                    where = f"round {rnd}: client {cid}{side}"
                    errors(where, problem.error, problem.traceback)
                failures.append(
                    FailureRecord(cid, problem.error, problem.side, up, down.get(cid, 0))
                )
                continue
            assert isinstance(reply, TrainReply)
            if reply.payload is not None:
                payloads[cid] = reply.payload
            clients[cid] = ClientRecord.from_reply(
                cid,
                str(student_spec(self.config, cid)),
                reply.metrics,
                bytes_up=up,
                bytes_down=down[cid],
                byzantine=cid in self.byzantine,
            )
        return clients, failures, payloads, replied

    def _aggregate(
        self, rnd: int, cids: list[int], payloads: dict[int, Payload]
    ) -> dict[str, float]:
        """Aggregate, distill and evaluate on the server; set the next round's targets."""
        cfg, strategy = self.config, self.strategy
        if payloads:  # what the strategy sees (central DP: one noisy mean, keyed -1)
            payloads = self.mechanism.aggregate(
                payloads, noise=self.noise, rnd=rnd, sampled=len(cids)
            )
        aggregate = None
        if payloads:
            aggregate = check_payload(strategy, "aggregate", self._hook("aggregate", payloads))
        metrics: dict[str, float] = {}
        if aggregate is not None:
            metrics.update(check_metrics(strategy, "distill", self._hook("distill", aggregate)))
        metrics.update(check_metrics(strategy, "evaluate", self._hook("evaluate")))
        targets = self._hook("targets", aggregate, public_indices(cfg, rnd + 1))
        self.targets = check_payload(strategy, "targets", targets)
        return metrics
