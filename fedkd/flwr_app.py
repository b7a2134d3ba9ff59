"""fedkd as a Flower app: ``flwr run .`` (Flower's own CLI) runs a fedkd experiment.

``pyproject.toml``'s ``[tool.flwr.app.components]`` points here. Both apps read the
run config (``[tool.flwr.app.config]``, overridden with ``flwr run . --run-config``):

* ``fedkd-config``: a fedkd TOML (as ``fedkd run`` takes); a relative path is read from
  the app's folder (the installed FAB, which holds ``simulations/*.toml``); ``""``: the
  quick-start defaults.
* ``overrides``: fedkd's dotted ``field=value`` overrides, separated by whitespace (so a
  value holds no spaces: ``clients.models=['mlp','cnn1d']``), e.g.
  ``"rounds=2 clients.count=4 output_dir=/tmp/runs"``.

Each side builds the same :class:`fedkd.config.Config` and prepares the same data
(:func:`fedkd.data.prepare_federated_data` is deterministic and cached), then runs
fedkd's own server loop and client handler (:func:`fedkd.flower.make_server_app`,
:func:`fedkd.flower.make_client_app`), so the numbers are those of ``fedkd run``. Client
state travels in the messages (as on a Ray cluster): SuperNodes need no shared disk.
The ServerApp writes the run folder as ``fedkd run`` does (rounds, checkpoints, the
baseline, the summary); a relative ``output_dir`` is resolved against the ServerApp's
working directory (that of the SuperLink), so give an absolute one.

Flower must run as many SuperNodes as a round samples (:func:`fedkd.flower.flower_nodes`):
``flwr run . --federation-config "num-supernodes=N"`` for the local simulation, and on
the deployment engine one ``flower-supernode --node-config "partition-id=i"`` per slot
``i`` (docs/flwr_run.md).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd.config import Config, ConfigError, load_config

log = logging.getLogger("fedkd")

CONFIG_KEY = "fedkd-config"
OVERRIDES_KEY = "overrides"

APP_DIR = Path(__file__).resolve().parent.parent  # the app's folder (the FAB's, when installed)


def config_from_run_config(run_config: Mapping[str, Any], app_dir: Path = APP_DIR) -> Config:
    """The fedkd Config a Flower run config names (see the module docstring)."""
    source = str(run_config.get(CONFIG_KEY, "") or "")
    overrides = str(run_config.get(OVERRIDES_KEY, "") or "").split()
    path: Path | None = None
    if source:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = app_dir / path
    cfg = load_config(path, overrides)
    if cfg.seeds:
        raise ConfigError("seeds", "a Flower app run is one seed; use `fedkd run` for seeds")
    if cfg.simulation.cluster_address:
        raise ConfigError(
            "simulation.ray_address",
            "under `flwr run`, Flower's SuperLink runs the clients; unset it",
        )
    return cfg


def _check_supernodes(grid: Grid, count: int, patience: float = 10.0) -> None:
    """Fewer SuperNodes than ``count`` after ``patience`` seconds: under Flower's
    simulation (all its nodes are there from the start) the run fails at once, saying
    how to fix it; on the deployment engine (nodes join as they start) a warning, and
    fedkd's own wait goes on until ``simulation.round_timeout``."""
    from flwr.superlink.grid import InMemoryGrid

    from fedkd.federation import RunFailed

    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if len(grid.get_node_ids()) >= count:
            return
        time.sleep(0.1)
    have = len(grid.get_node_ids())
    if have >= count:
        return
    message = (
        f"{have} SuperNode(s) connected, this config needs {count} (one per message of a "
        "round: the clients a round samples over simulation.clients_per_message): run "
        f'`flwr run . --federation-config "num-supernodes={count}"`, or start {count} '
        f'SuperNodes with --node-config "partition-id=0" .. "partition-id={count - 1}"'
    )
    if isinstance(grid, InMemoryGrid) and have > 0:
        raise RunFailed(message)
    log.warning("fedkd: %s", message)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run one fedkd experiment on the SuperNodes the grid reaches, writing its run
    folder as ``fedkd run`` does; raises if the run failed (Flower marks it failed)."""
    from fedkd.federation import Federation
    from fedkd.flower import FlowerJob, flower_nodes, make_server_app
    from fedkd.results import RunDirectory
    from fedkd.run_steps import Ending, finish, header, prepare, round_writer

    t0 = time.time()
    cfg = config_from_run_config(context.run_config)
    data, data_path = prepare(cfg)
    out = RunDirectory.create(cfg)
    print(header(cfg, out.path.resolve()), flush=True)
    federation = Federation(cfg, data)
    job = FlowerJob(
        federation,
        str(data_path),
        str(out.clients_dir),
        round_writer(cfg, out, federation, quiet=False),
        out.log_error,
    )
    stop = threading.Event()
    ended = Ending()
    try:
        _check_supernodes(grid, flower_nodes(cfg))
        make_server_app([job], stop, carry_state=True)(grid, context)
    except BaseException as err:  # noted as fedkd run notes it (re-raised below)
        ended.note(err, out)
    result, ended = finish(cfg, data, data_path, out, job, ended, stop, False, t0)
    if ended.interrupted:
        raise KeyboardInterrupt(result.summary.status)
    if ended.error is not None:
        raise RuntimeError(f"fedkd run failed: {ended.error} (see {out.path}/errors.log)")


_CLIENTS: dict[Any, ClientApp] = {}


def _inner_client_app(context: Context) -> ClientApp:
    """fedkd's ClientApp for this run config (built once per process and run config)."""
    from fedkd.data import prepare_federated_data
    from fedkd.flower import FlowerJob, make_client_app

    key = tuple(sorted((k, str(v)) for k, v in context.run_config.items()))
    if key not in _CLIENTS:
        cfg = config_from_run_config(context.run_config)
        _, data_path = prepare_federated_data(cfg)  # the same file the server built
        # Client state travels in the messages; this folder is only the fallback store.
        state_dir = Path(tempfile.gettempdir()) / "fedkd-flwr" / f"run-{context.run_id}"
        # make_client_app reads only ``federation.config`` of a job
        job = FlowerJob(SimpleNamespace(config=cfg), str(data_path), str(state_dir))  # type: ignore[arg-type]
        _CLIENTS.clear()
        _CLIENTS[key] = make_client_app([job])
    return _CLIENTS[key]


client_app = ClientApp()


def _serve(msg: Message, context: Context) -> Message:
    """Hand the message to fedkd's handler; a config or data error is replied as
    fedkd's handler replies its own (one line, the server logs it)."""
    from fedkd.flower import _error_reply

    try:
        app = _inner_client_app(context)
    except Exception as err:
        return _error_reply(msg, -1, err)
    return app(msg, context)


@client_app.query("hello")
def client_hello(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


@client_app.query("train")
def client_train(msg: Message, context: Context) -> Message:
    return _serve(msg, context)
