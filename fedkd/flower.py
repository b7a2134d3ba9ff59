"""Flower ServerApp / ClientApp for fedkd, run by Flower's simulation engine on Ray.

The apps are thin: they convert records to typed payloads and call the shared
round loop (:class:`fedkd.rounds.Federation`) and client code
(:class:`fedkd.client.ClientRuntime`). Messages carry public-set *indices* and
logits, never public inputs. Each client's student and optimizer persist across
rounds in Flower's ``Context.state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd.client import FitReply, get_runtime
from fedkd.config import Config
from fedkd.data import FederatedData
from fedkd.payloads import Payload
from fedkd.rounds import Failure, Federation, RoundCallback
from fedkd.wire import arrays_to_record, payload_to_record, record_to_payload

log = logging.getLogger("fedkd")
STATE_KEY = "fedkd.client"


def make_client_app(config: Config, data_path: str) -> ClientApp:
    """A ClientApp whose node with partition id i acts as client i."""
    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        get_runtime(config, data_path).warm_up()  # imports, data, first optimizer step
        cid = int(context.node_config["partition-id"])
        return Message(RecordDict({"meta": ConfigRecord({"cid": cid})}), reply_to=msg)

    @app.query("fit")
    def fit(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        content = msg.content
        rnd = int(content.config_records["config"]["round"])
        idx = content.array_records["query"]["public_idx"].numpy()
        runtime = get_runtime(config, data_path)  # imports user strategies (and their payloads)
        targets = None
        if "targets" in content.array_records:
            kind = str(content.config_records["config"]["targets_kind"])
            targets = record_to_payload(kind, content.array_records["targets"])
        saved = context.state.config_records.get(STATE_KEY)
        state = bytes(saved["blob"]) if saved is not None else None
        reply, new_state = runtime.fit(cid, rnd, state, targets, idx)
        context.state.config_records[STATE_KEY] = ConfigRecord({"blob": new_state})
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
        return Message(out, reply_to=msg)

    return app


class FlowerTransport:
    """Sends a round's request to the sampled clients' nodes through the Grid."""

    def __init__(self, grid: Grid, nodes: dict[int, int], timeout: float) -> None:
        self.grid = grid
        self.nodes = nodes  # client id -> node id
        self.timeout = timeout

    def fit(
        self, rnd: int, requests: dict[int, Payload | None], public_idx: np.ndarray
    ) -> dict[int, FitReply | Failure]:
        query = arrays_to_record({"public_idx": public_idx})
        records: dict[int, RecordDict] = {}  # one record per distinct targets object
        messages = []
        for cid, targets in requests.items():
            if id(targets) not in records:
                config: dict[str, Any] = {"round": rnd}
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
                    message_type="query.fit",
                    group_id=str(rnd),
                )
            )
        cids = list(requests)
        by_node = {node: cid for cid, node in self.nodes.items()}
        out: dict[int, FitReply | Failure] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = by_node[reply.metadata.src_node_id]
            if reply.has_error():
                out[cid] = Failure(cid, f"client raised: {reply.error.reason}")
                continue
            meta = reply.content.config_records["meta"]
            payload = None
            if meta["kind"]:
                try:
                    payload = record_to_payload(str(meta["kind"]), reply.content["payload"])
                except Exception as err:  # unknown kind or missing arrays: reject the reply
                    out[cid] = Failure(cid, f"unreadable payload: {err}")
                    continue
            metrics = {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}
            out[cid] = FitReply(cid, payload, metrics)
        for cid in cids:
            out.setdefault(cid, Failure(cid, f"no reply within {self.timeout:g} s"))
        return out


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """SuperNodes register asynchronously: wait until all ``count`` are present."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} simulated clients registered")
        time.sleep(0.05)


def _handshake(grid: Grid, nodes: Iterable[int], timeout: float) -> dict[int, int]:
    """Ask every node for its partition id (= client id); also warms the workers."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.hello") for n in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"a client failed to start: {reply.error.reason}")
        mapping[int(reply.content.config_records["meta"]["cid"])] = reply.metadata.src_node_id
    return mapping


def make_server_app(
    config: Config, data: FederatedData, on_round: RoundCallback | None, box: dict[str, Any]
) -> ServerApp:
    """A ServerApp that runs the federation; results and timings go into ``box``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = config.simulation.round_timeout
        nodes = _wait_for_nodes(grid, config.clients.count, timeout)
        mapping = _handshake(grid, nodes, timeout)
        missing = sorted(set(range(config.clients.count)) - set(mapping))
        if missing:
            raise RuntimeError(f"clients {missing} did not answer the start-up handshake")
        federation = Federation(config, data)
        box["federation"] = federation
        box["rounds_started"] = time.time()
        box["records"] = federation.run(FlowerTransport(grid, mapping, timeout), on_round)

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


def run_flower(
    config: Config,
    data: FederatedData,
    data_path: str,
    on_round: RoundCallback | None = None,
    box: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the federation under Flower's simulation engine with the Ray backend.

    ``box`` (returned, and filled as the run goes, so it is readable after an
    interruption) receives the federation, ``rounds_started`` and ``records``.
    """
    import os
    import warnings

    from flwr.simulation import run_simulation

    if not config.simulation.verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    box = {} if box is None else box
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        run_simulation(
            server_app=make_server_app(config, data, on_round, box),
            client_app=make_client_app(config, data_path),
            num_supernodes=config.clients.count,
            backend_name=config.simulation.backend,
            backend_config=backend_config(config),
            verbose_logging=config.simulation.verbose,
        )
    return box
