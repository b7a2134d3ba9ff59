"""Flower ServerApp / ClientApp for fedkd, run by Flower's simulation engine on Ray.

The apps are thin: they convert records to typed payloads and call the shared
round loop (:class:`fedkd.federation.Federation`) and client code
(:class:`fedkd.client.ClientRuntime`). Messages carry public-set *indices* and
logits, never public inputs. Each client's student and optimizer persist across
rounds in the run folder's client-state store (:mod:`fedkd.state_store`), which is
also what checkpoints and ``fedkd resume`` rely on.

Ray is private to the run, or, with ``simulation.ray_address``, a running cluster
(docs/ray_cluster.md) whose nodes share no disk with this process: then each
client's state travels in its messages (the server keeps it in the run folder, sends
it with a request and stores what the reply brings back), and the run's data file
goes once through Ray's object store to a copy on each node. The cluster is left
running; only this process's connection to it ends.

A client's exception is caught in its handler and sent back as one plain line plus
the traceback, so neither Flower nor Ray prints it; the server logs it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd.assignment import clients_per_message, clients_per_round
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
    by_targets,
)
from fedkd.payloads import Payload
from fedkd.results.rundir import atomic_write_bytes, plain_text
from fedkd.state_store import DiskStateStore, StateStore
from fedkd.wire import arrays_to_record, payload_to_record, record_to_payload

log = logging.getLogger("fedkd")


def _error_reply(msg: Message, cid: int, err: BaseException) -> Message:
    """A reply that reports a failure in one plain line, with the traceback beside it
    (so Flower and Ray print nothing, and the server logs it once to errors.log)."""
    return Message(RecordDict({"error": _error_record(cid, err)}), reply_to=msg)


def _error_record(cid: int, err: BaseException) -> ConfigRecord:
    """Client ``cid``'s failure: one plain line, which side caused it, the traceback."""
    f = Failure.from_exception(cid, err)
    return ConfigRecord(
        {"cid": cid, "error": f.error, "side": f.side, "traceback": f.traceback or ""}
    )


@dataclass
class FlowerJob:
    """One federation to run under a shared Flower + Ray start (e.g. one seed of many):
    its server state, the files its clients read and write, and its callbacks.
    ``error`` is set when its federation failed (the next job still runs).
    ``on_end`` is called in the server loop's thread when its federation has ended
    (completed or failed, not interrupted), before the next job starts."""

    federation: Federation
    data_path: str
    state_dir: str
    on_round: RoundCallback | None = None
    errors: ErrorLog | None = None
    box: dict[str, Any] = field(default_factory=dict)
    error: RunFailed | None = None
    on_end: Callable[[], None] | None = None


@dataclass(frozen=True)
class DataFile:
    """The data file a job's clients load: ``path`` on this machine, or, on a cluster,
    its bytes in Ray's object store (``ref``), copied once to each node that needs them."""

    path: str
    digest: str = ""  # of the contents (names the node-local copy)
    ref: Any = None  # a Ray ObjectRef to the contents; None: read ``path``

    def local_path(self) -> str:
        """A path to the data on the machine this runs on."""
        if self.ref is None:
            return self.path
        copy = Path(tempfile.gettempdir()) / "fedkd-data" / f"{self.digest}.npz"
        if not copy.is_file():  # written atomically: a file there is whole
            import ray

            atomic_write_bytes(copy, ray.get(self.ref))
        return str(copy)


def ship_data(paths: Iterable[str]) -> dict[str, DataFile]:
    """Put each data file into the object store of the Ray cluster this process is
    connected to, so clients on nodes without this machine's disk can load it."""
    import ray

    out: dict[str, DataFile] = {}
    for path in paths:
        if path not in out:
            blob = Path(path).read_bytes()
            out[path] = DataFile(path, hashlib.sha256(blob).hexdigest()[:32], ray.put(blob))
    return out


class CarriedState:
    """The state store of one request whose clients' states travel in the messages:
    ``load`` gives the state the server sent for a client (its newest from before the
    round), and ``save`` keeps the new one for the reply."""

    def __init__(self, blobs: dict[int, bytes]) -> None:
        self.blobs = blobs
        self.saved: dict[int, bytes] = {}

    def load(self, cid: int, before_round: int) -> bytes | None:
        return self.blobs.get(cid)

    def save(self, cid: int, rnd: int, blob: bytes) -> None:
        self.saved[cid] = blob


def make_client_app(
    jobs: Sequence[FlowerJob], files: dict[str, DataFile] | None = None
) -> ClientApp:
    """A ClientApp whose nodes are slots: each message names the clients it is for
    (``client.cids``, run in turn or, with ``simulation.vectorize``, trained together)
    and the job (``run``: its index in ``jobs``), so a node serves whichever sampled
    clients a round hands it (:func:`flower_nodes`); client state is
    kept in the job's ``state_dir`` (see :mod:`fedkd.state_store`), or travels in the
    messages when they carry it. ``files``: where to load each job's ``data_path`` from
    (default: itself)."""
    app = ClientApp()
    files = files or {}
    runs = [
        (j.federation.config, files.get(j.data_path, DataFile(j.data_path)), j.state_dir)
        for j in jobs
    ]

    def runtime_of(run: int) -> Any:
        config, data, state_dir = runs[run]
        return get_runtime(config, data.local_path(), state_dir)  # imports user strategies

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        slot = int(context.node_config["partition-id"])
        try:
            runtime_of(0).warm_up()  # imports, data, first step
        except Exception as err:
            return _error_reply(msg, -1, err)
        return Message(RecordDict({"meta": ConfigRecord({"slot": slot})}), reply_to=msg)

    @app.query("train")
    def train(msg: Message, context: Context) -> Message:
        try:
            return Message(_train(msg.content, runtime_of), reply_to=msg)
        except Exception as err:  # e.g. unreadable targets: every client of the message
            return _error_reply(msg, -1, err)

    return app


def _train(content: RecordDict, runtime_of: Any) -> RecordDict:
    """The rounds of the clients a train message names (``client.cids``), as it asks
    them: the reply's content, with each client's records suffixed by its position in
    the message (``meta.0``, ``metrics.0``, ``payload.0``, ``state.0``; ``error.0``
    where that client's round raised)."""
    configs = content.config_records  # read once: each access filters every record
    config = configs["config"]
    rnd = int(config["round"])
    cids = [int(c) for c in configs["client"]["cids"]]
    idx = content.array_records["query"]["public_idx"].numpy()
    runtime = runtime_of(int(config.get("run", 0)))
    targets = None
    if "targets" in content.array_records:
        kind = str(config["targets_kind"])
        try:
            targets = record_to_payload(kind, content.array_records["targets"])
        except Exception as err:
            raise TargetsError(f"unreadable {kind} targets from the server: {err}") from err
    carried = None
    if config.get("carry_state", False):
        blobs = {cid: bytes(configs[f"state.{cid}"]["blob"]) for cid in cids
                 if f"state.{cid}" in configs}  # fmt: skip
        carried = CarriedState(blobs)
    together = runtime.config.simulation.vectorize
    replies = runtime.train_many(cids, rnd, targets, idx, store=carried, together=together)
    out = RecordDict()
    for i, cid in enumerate(cids):
        reply = replies[cid]
        if isinstance(reply, Exception):
            out[f"error.{i}"] = _error_record(cid, reply)
            continue
        kind = reply.payload.kind if reply.payload else ""
        out[f"meta.{i}"] = ConfigRecord({"cid": cid, "kind": kind})
        out[f"metrics.{i}"] = MetricRecord(reply.metrics)
        if reply.payload is not None:
            out[f"payload.{i}"] = payload_to_record(reply.payload)
        if carried is not None and cid in carried.saved:
            out[f"state.{i}"] = ConfigRecord({"blob": carried.saved[cid]})
    return out


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


def _read_replies(cids: list[int], reply: Message) -> dict[int, TrainReply | Failure]:
    """The replies of the clients a message carried (``cids``, in its order): each a
    TrainReply or the Failure it reports (the whole message's failure, e.g. a dead
    worker, is each of its clients'). The record maps are read once: each access
    filters all of the message's records."""
    failure = _reported_failure(-1, reply)
    if failure is not None:
        return {cid: Failure(cid, failure.error, failure.side, failure.traceback) for cid in cids}
    content = reply.content
    configs, metrics, arrays = content.config_records, content.metric_records, content.array_records
    return {cid: _read_one(i, cid, configs, metrics, arrays) for i, cid in enumerate(cids)}


def _read_one(i: int, cid: int, configs: Any, metrics: Any, arrays: Any) -> TrainReply | Failure:
    """The ``i``-th client's part of a reply (client ``cid``), from its record maps."""
    if f"error.{i}" in configs:
        e = configs[f"error.{i}"]
        return Failure(cid, str(e["error"]), str(e["side"]), str(e["traceback"]) or None)
    meta = configs[f"meta.{i}"]
    values = {k: float(v) for k, v in metrics[f"metrics.{i}"].items()}
    payload = None
    if meta["kind"]:
        try:
            payload = record_to_payload(str(meta["kind"]), arrays[f"payload.{i}"])
        except Exception as err:  # unknown kind or missing arrays: the client's fault
            error = f"unreadable {meta['kind']} payload: {one_line(err)}"
            return Failure(cid, error, metrics=values)  # it was sent: privacy is charged
    return TrainReply(cid, payload, values)


class FlowerTransport:
    """Sends a round's request to the sampled clients' nodes through the Grid, and waits
    for the replies until ``timeout`` or until ``stop`` is set (Ctrl-C).

    With ``states`` (the run folder's client-state store), each client's state travels
    in its messages: sent with its request, and the one its reply brings saved there."""

    def __init__(
        self,
        grid: Grid,
        nodes: Sequence[int],
        timeout: float,
        stop: StopSignal | None = None,
        run: int = 0,
        states: StateStore | None = None,
        per_message: int = 1,
    ) -> None:
        self.grid = grid
        self.per_message = per_message  # clients one message carries
        self.nodes = list(nodes)  # node ids by slot: a round's i-th client goes to slot i
        self.timeout = timeout
        self.stop = stop
        self.run = run  # which job of the ClientApp the messages are for
        self.states = states

    def _messages(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> tuple[list[Message], list[list[int]]]:
        """The round's train messages, and the clients each carries (clients that share
        a targets object, up to ``per_message`` of them)."""
        query = arrays_to_record({"public_idx": public_idx})
        messages, groups = [], []
        for targets, cids in by_targets(requests):
            config: dict[str, Any] = {"round": rnd, "run": self.run}
            shared = RecordDict({"query": query})
            if targets is not None:
                shared["targets"] = payload_to_record(targets)
                config["targets_kind"] = targets.kind
            if self.states is not None:
                config["carry_state"] = True
            shared["config"] = ConfigRecord(config)
            for start in range(0, len(cids), self.per_message):
                group = cids[start : start + self.per_message]
                content = RecordDict(dict(shared.items()))  # shared records, and:
                content["client"] = ConfigRecord({"cids": group})  # whom it is for
                for cid in group if self.states is not None else ():
                    blob = self.states.load(cid, rnd)
                    if blob is not None:
                        content[f"state.{cid}"] = ConfigRecord({"blob": blob})
                node = self.nodes[len(messages) % len(self.nodes)]
                messages.append(
                    Message(content, dst_node_id=node, message_type="query.train",
                            group_id=str(rnd))
                )  # fmt: skip
                groups.append(group)
        return messages, groups

    def train(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, TrainReply | Failure]:
        messages, groups = self._messages(rnd, requests, public_idx)
        out: dict[int, TrainReply | Failure] = {}
        for m, reply in send_and_wait(self.grid, messages, self.timeout, self.stop, f"round {rnd}"):
            out.update(_read_replies(groups[m], reply))
            if self.states is not None and not reply.has_error():
                configs = reply.content.config_records
                for i, cid in enumerate(groups[m]):
                    state = configs.get(f"state.{i}")
                    if state is not None:  # as the client would have saved it itself
                        self.states.save(cid, rnd, bytes(state["blob"]))
        for cid in requests:
            out.setdefault(cid, Failure(cid, f"no reply within {self.timeout:g} s"))
        return out


def send_and_wait(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    stop: StopSignal | None,
    what: str,
) -> Iterator[tuple[int, Message]]:
    """Push ``messages`` and yield ``(index of the message, reply)`` as replies come, until
    all are in or ``timeout`` passes; raises :class:`Interrupted` within ~10 ms of
    ``stop`` being set."""
    index = {mid: i for i, mid in enumerate(grid.push_messages(messages))}
    pending = set(index)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped during {what}")
        for reply in grid.pull_messages(pending):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            yield index[mid], reply
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
    """Ask every node for its partition id (its slot); also warms the workers."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.hello") for n in nodes]
    mapping: dict[int, int] = {}
    for _, reply in send_and_wait(grid, msgs, timeout, stop, "start-up"):
        failure = _reported_failure(-1, reply)
        if failure is not None:  # one line here; the traceback goes to errors.log as the cause
            who = f"client {failure.cid}" if failure.cid >= 0 else "a client"
            cause = RuntimeError(failure.traceback) if failure.traceback else None
            raise RunFailed(f"{who} failed to start: {failure.error}") from cause
        mapping[int(reply.content.config_records["meta"]["slot"])] = reply.metadata.src_node_id
    return mapping


def flower_nodes(config: Config, workers: int | None = None) -> int:
    """How many Flower SuperNodes simulate the clients: as many as a round's messages
    (a round's sampled clients, ``clients_per_message`` to a message: see
    :func:`fedkd.assignment.clients_per_message`; ``workers``: how many clients run at
    once, default :func:`local_workers`), each serving whichever clients a message
    names. Client state is keyed by client id, so which node serves a client changes
    nothing; a strategy that samples more is served round-robin (slower, not wrong).
    Fewer nodes than clients keep Flower's in-memory link state small: it scans every
    node against every stored message, so 10,000 nodes stall start-up for hours."""
    workers = local_workers(config) if workers is None else workers
    per_message = clients_per_message(config, workers)
    return -(-clients_per_round(config) // per_message)


def local_workers(config: Config) -> int:
    """How many clients a Ray started on this machine runs at once: its CPUs
    (``simulation.ray_init_args.num_cpus``, else all) over ``simulation.num_cpus``."""
    cpus = config.simulation.ray_init_args.get("num_cpus") or os.cpu_count() or 1
    return max(1, int(float(cpus) / config.simulation.num_cpus))


def make_server_app(
    jobs: Sequence[FlowerJob],
    stop: StopSignal | None = None,
    keep_going: bool = False,
    carry_state: bool = False,
    workers: int | None = None,
) -> ServerApp:
    """A ServerApp that runs (or continues) each job's federation in turn, on the same
    simulated clients; each job's ``box`` gets ``rounds_started`` (the first job's also
    ``clients_ready``: every worker answered the start-up handshake). A failed federation
    raises :class:`RunFailed`, or, with ``keep_going``, is kept in its job's ``error``
    and the next job runs. Ctrl-C (``stop``) ends them all. ``carry_state``: client
    states travel in the messages (kept in each job's ``state_dir`` here)."""
    app = ServerApp()
    first = jobs[0].federation.config  # (the jobs share the engine: see run_flower_jobs)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = first.simulation.round_timeout
        workers_ = local_workers(first) if workers is None else workers
        slots = max(flower_nodes(j.federation.config, workers_) for j in jobs)
        nodes = _wait_for_nodes(grid, slots, timeout, stop)
        mapping = _handshake(grid, nodes, timeout, stop)
        missing = sorted(set(range(slots)) - set(mapping))
        if missing:
            raise RunFailed(f"nodes {missing} did not answer the start-up handshake")
        by_slot = [mapping[s] for s in range(slots)]
        jobs[0].box["clients_ready"] = time.time()  # every worker started and warmed up
        for run, job in enumerate(jobs):
            if stop is not None and stop.is_set():  # (e.g. set by an earlier job's on_end)
                raise Interrupted("stopped before the next federation")
            job.box["rounds_started"] = time.time()
            config = job.federation.config
            states = DiskStateStore(job.state_dir) if carry_state else None
            per_message = clients_per_message(config, workers_)
            transport = FlowerTransport(
                grid, by_slot, config.simulation.round_timeout, stop, run, states, per_message
            )
            try:
                job.federation.run(transport, job.on_round, stop=stop, errors=job.errors)
            except RunFailed as err:
                if not keep_going:
                    raise
                job.error = err
            finally:
                job.box["rounds_ended"] = time.time()
            if job.on_end is not None:
                job.on_end()

    return app


def ray_init_args(config: Config) -> dict[str, Any]:
    """The ``ray.init`` arguments: quiet unless verbose, ``simulation.ray_init_args``, and
    the address (``"local"``, a private Ray, unless a cluster is named)."""
    sim = config.simulation
    init_args: dict[str, Any] = {"include_dashboard": False}
    if not sim.verbose:
        init_args.update(logging_level=logging.ERROR, log_to_driver=False)
    init_args.update(sim.ray_init_args)
    init_args["address"] = sim.cluster_address or "local"  # "local": ignore $RAY_ADDRESS
    return init_args


def client_resources(config: Config, gpus_present: bool | None = None) -> dict[str, float]:
    """The Ray resources each client reserves. Unset, ``num_gpus`` is 0.2 where GPUs are
    present (``gpus_present``; default: this machine has CUDA) unless ``device = "cpu"``."""
    sim = config.simulation
    num_gpus = sim.num_gpus
    if num_gpus is None:
        if gpus_present is None:
            import torch

            gpus_present = torch.cuda.is_available()
        num_gpus = 0.2 if config.device != "cpu" and gpus_present else 0.0
    return {"num_cpus": float(sim.num_cpus), "num_gpus": float(num_gpus)}


def backend_config(config: Config, gpus_present: bool | None = None) -> dict[str, Any]:
    """Ray backend settings: per-client resources and ``ray.init`` arguments."""
    return {
        "client_resources": client_resources(config, gpus_present),
        "init_args": ray_init_args(config),
    }


def engine_key(config: Config) -> str:
    """What runs under one Flower simulation must share: the backend, ``ray.init``'s
    arguments (cluster address included), the per-client resources, the device (on a
    cluster it decides the GPU reservation) and verbosity. Runs
    with equal keys can share one Ray start (:func:`run_flower_jobs`)."""
    sim = config.simulation
    key = [sim.backend, sim.verbose, backend_config(config), config.device]
    return json.dumps(key, sort_keys=True, default=str)


def clients_per_node(node: dict[str, float], resources: dict[str, float]) -> int:
    """How many clients needing ``resources`` fit on a node (as Flower counts them)."""
    fit = int(node.get("CPU", 0) / resources["num_cpus"])
    if resources["num_gpus"] > 0:
        fit = min(fit, int(node.get("GPU", 0) / resources["num_gpus"]))
    return fit


def _check_reachable(address: str) -> None:
    """Fail at once where no Ray cluster answers at ``address`` ("auto" or host:port):
    ``ray.init`` would retry for minutes."""
    target: str | None = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray: let ray.init find the cluster
            return
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError as err:
            raise RunFailed(
                f"no running Ray cluster found for simulation.ray_address = auto ({one_line(err)});"
                " start one with `ray start --head`, or give its head node's host:port"
            ) from err
        if target is None:
            return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except (OSError, ValueError) as err:
        raise RunFailed(
            f"no Ray cluster answers at {target} (simulation.ray_address): {err}; is its head "
            f"node running (`ray start --head --port={port}` there)?"
        ) from err


def attach_cluster(config: Config) -> tuple[dict[str, Any], int]:
    """Connect this process to the running Ray cluster ``simulation.ray_address`` names,
    check that it can host a client, and return the backend settings for it (Flower's
    Ray backend uses this connection, and ends only it, not the cluster) and how many
    clients it runs at once."""
    import ray

    init_args = ray_init_args(config)
    address = init_args["address"]
    args = {k: v for k, v in init_args.items() if k not in ("address", "runtime_env")}
    # as Flower does for a Ray it starts: workers import what this process can
    runtime_env = dict(init_args.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(paths))
    runtime_env["env_vars"] = env_vars
    _check_reachable(address)
    try:
        ray.init(address=address, runtime_env=runtime_env, **args)
    except Exception as err:
        raise RunFailed(
            f"could not attach to the Ray cluster at {address}: {one_line(err)}"
        ) from err
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    resources = client_resources(config, any(n.get("GPU", 0) > 0 for n in nodes))
    fit = sum(clients_per_node(n, resources) for n in nodes)
    cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    if fit == 0:
        raise RunFailed(
            f"no node of the Ray cluster at {address} ({len(nodes)} node(s), {cpus:g} CPUs, "
            f"{gpus:g} GPUs) can host a client needing {resources['num_cpus']:g} CPUs and "
            f"{resources['num_gpus']:g} GPUs (simulation.num_cpus, simulation.num_gpus)"
        )
    log.info(
        "attached to the Ray cluster at %s: %d node(s), %g CPUs, %g GPUs; %d client(s) at a time",
        address, len(nodes), cpus, gpus, fit,
    )  # fmt: skip
    return {"client_resources": resources, "init_args": init_args}, fit


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
    """Run several federations one after another under one Flower simulation and one
    Ray start (the seeds of a run, the runs of a sweep). They must share the engine
    (:func:`engine_key`: backend, Ray settings, per-client resources); client counts,
    sampling, timeouts and clients per message may differ (the simulation has as many
    nodes as the largest needs).

    See :func:`make_server_app` for failures; raises :class:`Interrupted` on Ctrl-C.
    """
    import warnings

    from flwr.simulation import run_simulation

    config = jobs[0].federation.config
    for job in jobs[1:]:
        if engine_key(job.federation.config) != engine_key(config):
            raise ValueError(
                f"{job.federation.config.name} does not share the engine of {config.name} "
                "(simulation backend, Ray settings or per-client resources differ)"
            )
    if not config.simulation.verbose:
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logging.getLogger("ray").setLevel(logging.CRITICAL)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ended = threading.Event()  # set when the simulation returns: the server loop must end too
    halt = AnyEvent(ended) if stop is None else AnyEvent(stop, ended)
    cluster = bool(config.simulation.cluster_address)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        try:
            files: dict[str, DataFile] = {}
            if cluster:  # its nodes may share neither this disk nor each other's
                backend, workers = attach_cluster(config)
                files = ship_data(j.data_path for j in jobs)
            else:
                backend, workers = backend_config(config), local_workers(config)
            jobs[0].box["engine_started"] = time.time()  # Ray and the workers start now
            run_simulation(
                server_app=make_server_app(jobs, halt, keep_going, cluster, workers),
                client_app=make_client_app(jobs, files),
                num_supernodes=max(flower_nodes(j.federation.config, workers) for j in jobs),
                backend_name=config.simulation.backend,
                backend_config=backend,
                verbose_logging=config.simulation.verbose,
            )
        finally:
            ended.set()
            if cluster:
                _disconnect()


def _disconnect() -> None:
    """End this process's connection to the cluster (Flower's backend usually has);
    the cluster keeps running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class AnyEvent:
    """Set when any of its events is (the stop signal the server loop polls)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)
