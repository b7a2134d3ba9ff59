"""Flower ServerApp / ClientApp for fedkd, run by Flower's simulation engine on Ray.

The apps are thin: they convert records to typed payloads and call the shared
round loop (:class:`fedkd.federation.Federation`) and client code
(:class:`fedkd.client.ClientRuntime`). Messages carry public-set *indices* and
logits, never public inputs. Each client's student and optimizer persist across
rounds in the run folder's client-state store (:mod:`fedkd.state_store`), which is
also what checkpoints and ``fedkd resume`` rely on.

A client's exception is caught in its handler and sent back as one plain line plus
the traceback, so neither Flower nor Ray prints it; the server logs it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd.client import TargetsError, TrainReply, get_runtime
from fedkd.config import Config
from fedkd.contracts import one_line
from fedkd.federation import (
    ErrorLog,
    Failure,
    Federation,
    Interrupted,
    RoundCallback,
    RunFailed,
    StopSignal,
)
from fedkd.payloads import Payload
from fedkd.results.rundir import plain_text
from fedkd.wire import arrays_to_record, payload_to_record, record_to_payload

log = logging.getLogger("fedkd")


def _error_reply(msg: Message, cid: int, err: BaseException) -> Message:
    """A reply that reports a failure in one plain line, with the traceback beside it
    (so Flower and Ray print nothing, and the server logs it once to errors.log)."""
    f = Failure.from_exception(cid, err)
    content = {"cid": cid, "error": f.error, "side": f.side, "traceback": f.traceback or ""}
    return Message(RecordDict({"error": ConfigRecord(content)}), reply_to=msg)


@dataclass
class FlowerJob:
    """One federation to run under a shared Flower + Ray start (e.g. one seed of many):
    its server state, the files its clients read and write, and its callbacks.
    ``error`` is set when its federation failed (the next job still runs)."""

    federation: Federation
    data_path: str
    state_dir: str
    on_round: RoundCallback | None = None
    errors: ErrorLog | None = None
    box: dict[str, Any] = field(default_factory=dict)
    error: RunFailed | None = None


def make_client_app(jobs: Sequence[FlowerJob]) -> ClientApp:
    """A ClientApp whose node with partition id i acts as client i of whichever job a
    message names (``run``: its index in ``jobs``); client state is kept in the job's
    ``state_dir`` (see :mod:`fedkd.state_store`)."""
    app = ClientApp()
    runs = [(j.federation.config, j.data_path, j.state_dir) for j in jobs]

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        try:
            get_runtime(*runs[0]).warm_up()  # imports, data, first step
        except Exception as err:
            return _error_reply(msg, cid, err)
        return Message(RecordDict({"meta": ConfigRecord({"cid": cid})}), reply_to=msg)

    @app.query("train")
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        content = msg.content
        try:
            rnd = int(content.config_records["config"]["round"])
            run = int(content.config_records["config"].get("run", 0))
            idx = content.array_records["query"]["public_idx"].numpy()
            runtime = get_runtime(*runs[run])  # imports user strategies
            targets = None
            if "targets" in content.array_records:
                kind = str(content.config_records["config"]["targets_kind"])
                try:
                    targets = record_to_payload(kind, content.array_records["targets"])
                except Exception as err:
                    raise TargetsError(f"unreadable {kind} targets from the server: {err}") from err
            reply = runtime.train(cid, rnd, targets, idx)
            out = RecordDict(
                {
                    "meta": ConfigRecord(
                        {"cid": cid, "kind": reply.payload.kind if reply.payload else ""}
                    ),
                    "metrics": MetricRecord(reply.metrics),
                }
            )
            if reply.payload is not None:
                out["payload"] = payload_to_record(reply.payload)
        except Exception as err:
            return _error_reply(msg, cid, err)
        return Message(out, reply_to=msg)

    return app


def _reported_failure(cid: int, reply: Message) -> Failure | None:
    """The failure a reply reports: one our handler caught (a line and the traceback), or
    one raised outside it, e.g. a dead worker (Ray's traceback, without colours)."""
    if reply.has_error():
        text = plain_text(str(reply.error.reason))
        lines = [x for x in text.strip().splitlines() if x.strip()]
        last = lines[-1] if lines else "unknown error"
        return Failure(cid, f"client raised: {last}", "client", text)
    if "error" in reply.content.config_records:
        e = reply.content.config_records["error"]
        return Failure(int(e["cid"]), str(e["error"]), str(e["side"]), str(e["traceback"]) or None)
    return None


def _read_reply(cid: int, reply: Message) -> TrainReply | Failure:
    """A client's reply message as a TrainReply, or the Failure it reports."""
    failure = _reported_failure(cid, reply)
    if failure is not None:
        return failure
    meta = reply.content.config_records["meta"]
    metrics = {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}
    payload = None
    if meta["kind"]:
        try:
            payload = record_to_payload(str(meta["kind"]), reply.content["payload"])
        except Exception as err:  # unknown kind or missing arrays: the client's fault
            error = f"unreadable {meta['kind']} payload: {one_line(err)}"
            return Failure(cid, error, metrics=metrics)  # it was sent: privacy is charged
    return TrainReply(cid, payload, metrics)


class FlowerTransport:
    """Sends a round's request to the sampled clients' nodes through the Grid, and waits
    for the replies until ``timeout`` or until ``stop`` is set (Ctrl-C)."""

    def __init__(
        self,
        grid: Grid,
        nodes: dict[int, int],
        timeout: float,
        stop: StopSignal | None = None,
        run: int = 0,
    ) -> None:
        self.grid = grid
        self.nodes = nodes  # client id -> node id
        self.timeout = timeout
        self.stop = stop
        self.run = run  # which job of the ClientApp the messages are for

    def _messages(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> list[Message]:
        query = arrays_to_record({"public_idx": public_idx})
        records: dict[int, RecordDict] = {}  # one record per distinct targets object
        messages = []
        for cid, targets in requests.items():
            if id(targets) not in records:
                config: dict[str, Any] = {"round": rnd, "run": self.run}
                content = RecordDict({"query": query})
                if targets is not None:
                    content["targets"] = payload_to_record(targets)
                    config["targets_kind"] = targets.kind
                content["config"] = ConfigRecord(config)
                records[id(targets)] = content
            messages.append(
                Message(
                    records[id(targets)],
                    dst_node_id=self.nodes[cid],
                    message_type="query.train",
                    group_id=str(rnd),
                )
            )
        return messages

    def train(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, TrainReply | Failure]:
        by_node = {node: cid for cid, node in self.nodes.items()}
        messages = self._messages(rnd, requests, public_idx)
        out: dict[int, TrainReply | Failure] = {}
        for reply in send_and_wait(self.grid, messages, self.timeout, self.stop, f"round {rnd}"):
            cid = by_node[reply.metadata.src_node_id]
            out[cid] = _read_reply(cid, reply)
        for cid in requests:
            out.setdefault(cid, Failure(cid, f"no reply within {self.timeout:g} s"))
        return out


def send_and_wait(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    stop: StopSignal | None,
    what: str,
) -> Iterator[Message]:
    """Push ``messages`` and yield the replies as they come, until all are in or
    ``timeout`` passes; raises :class:`Interrupted` within ~10 ms of ``stop`` being set."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped during {what}")
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending:
            time.sleep(0.01)


def _wait_for_nodes(grid: Grid, count: int, timeout: float, stop: StopSignal | None) -> list[int]:
    """SuperNodes register asynchronously: wait until all ``count`` are present."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while the clients started")
        if time.monotonic() > deadline:
            raise RunFailed(f"only {len(nodes)} of {count} simulated clients registered")
        time.sleep(0.05)


def _handshake(
    grid: Grid, nodes: Iterable[int], timeout: float, stop: StopSignal | None
) -> dict[int, int]:
    """Ask every node for its partition id (= client id); also warms the workers."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.hello") for n in nodes]
    mapping: dict[int, int] = {}
    for reply in send_and_wait(grid, msgs, timeout, stop, "start-up"):
        failure = _reported_failure(-1, reply)
        if failure is not None:  # one line here; the traceback goes to errors.log as the cause
            who = f"client {failure.cid}" if failure.cid >= 0 else "a client"
            cause = RuntimeError(failure.traceback) if failure.traceback else None
            raise RunFailed(f"{who} failed to start: {failure.error}") from cause
        mapping[int(reply.content.config_records["meta"]["cid"])] = reply.metadata.src_node_id
    return mapping


def make_server_app(
    jobs: Sequence[FlowerJob], stop: StopSignal | None = None, keep_going: bool = False
) -> ServerApp:
    """A ServerApp that runs (or continues) each job's federation in turn, on the same
    simulated clients; each job's ``box`` gets ``rounds_started``. A failed federation
    raises :class:`RunFailed`, or, with ``keep_going``, is kept in its job's ``error``
    and the next job runs. Ctrl-C (``stop``) ends them all."""
    app = ServerApp()
    config = jobs[0].federation.config

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = config.simulation.round_timeout
        nodes = _wait_for_nodes(grid, config.clients.count, timeout, stop)
        mapping = _handshake(grid, nodes, timeout, stop)
        missing = sorted(set(range(config.clients.count)) - set(mapping))
        if missing:
            raise RunFailed(f"clients {missing} did not answer the start-up handshake")
        for run, job in enumerate(jobs):
            job.box["rounds_started"] = time.time()
            transport = FlowerTransport(grid, mapping, timeout, stop, run)
            try:
                job.federation.run(transport, job.on_round, stop=stop, errors=job.errors)
            except RunFailed as err:
                if not keep_going:
                    raise
                job.error = err
            finally:
                job.box["rounds_ended"] = time.time()

    return app


def backend_config(config: Config) -> dict[str, Any]:
    """Ray backend settings: per-client resources and ``ray.init`` arguments."""
    sim = config.simulation
    num_gpus = sim.num_gpus
    if num_gpus is None:
        import torch

        num_gpus = 0.2 if config.device != "cpu" and torch.cuda.is_available() else 0.0
    init_args: dict[str, Any] = {"include_dashboard": False}
    if not sim.verbose:
        init_args.update(logging_level=logging.ERROR, log_to_driver=False)
    init_args.update(sim.ray_init_args)
    return {
        "client_resources": {"num_cpus": sim.num_cpus, "num_gpus": float(num_gpus)},
        "init_args": init_args,
    }


@contextlib.contextmanager
def ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """While active, the first Ctrl-C sets ``stop`` (the round loop ends within a second
    and the run is written as interrupted); a second one exits at once (code 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()
        print("\nfedkd: stopping (Ctrl-C again to quit at once)...", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_flower(
    federation: Federation,
    data_path: str,
    state_dir: str,
    on_round: RoundCallback | None = None,
    box: dict[str, Any] | None = None,
    *,
    stop: StopSignal | None = None,
    errors: ErrorLog | None = None,
) -> dict[str, Any]:
    """Run (or continue) ``federation`` under Flower's simulation engine on Ray.

    ``box`` (returned, filled as the run goes) receives ``rounds_started``. Raises
    :class:`RunFailed` or :class:`Interrupted` as the round loop does.
    """
    job = FlowerJob(federation, data_path, state_dir, on_round, errors, {} if box is None else box)
    run_flower_jobs([job], stop=stop)
    return job.box


def run_flower_jobs(
    jobs: Sequence[FlowerJob], *, stop: StopSignal | None = None, keep_going: bool = False
) -> None:
    """Run several federations of the same shape (client count, resources), one after
    another, under one Flower simulation and one Ray start (e.g. the seeds of a run).

    See :func:`make_server_app` for failures; raises :class:`Interrupted` on Ctrl-C.
    """
    import warnings

    from flwr.simulation import run_simulation

    config = jobs[0].federation.config
    if not config.simulation.verbose:
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logging.getLogger("ray").setLevel(logging.CRITICAL)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ended = threading.Event()  # set when the simulation returns: the server loop must end too
    halt = AnyEvent(ended) if stop is None else AnyEvent(stop, ended)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        try:
            run_simulation(
                server_app=make_server_app(jobs, halt, keep_going),
                client_app=make_client_app(jobs),
                num_supernodes=config.clients.count,
                backend_name=config.simulation.backend,
                backend_config=backend_config(config),
                verbose_logging=config.simulation.verbose,
            )
        finally:
            ended.set()


class AnyEvent:
    """Set when any of its events is (the stop signal the server loop polls)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)
