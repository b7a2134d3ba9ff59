"""Attaching runs to a running Ray cluster (``simulation.ray_address``).

The fast tests check the config and the message path that makes a cluster safe: each
client's state travels in its messages (the server keeps it in the run folder), so a
client gives the same numbers whichever node runs it. The slow test starts a real
head node on loopback (its own temp dir and ports), attaches a run to it, and checks
that the run completes, matches the in-process runner, and leaves the cluster up; the
head node, and every process it started, is then ended by process id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

import fedkd
from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, RunFailed
from fedkd.flower import (
    DataFile,
    FlowerJob,
    FlowerTransport,
    attach_cluster,
    client_resources,
    clients_per_node,
    make_client_app,
    ray_init_args,
)
from fedkd.inline import InlineTransport
from fedkd.state_store import DiskStateStore
from tests.conftest import SMALL

RAY = str(Path(sys.executable).with_name("ray"))


def _students(records):
    """Each round's students, to compare bit for bit: (accuracy, loss, train loss)."""
    return [
        {c: (x.accuracy, x.loss, x.metrics["train_loss"]) for c, x in r.clients.items()}
        for r in records
    ]


def _error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    return raised.value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("10.0.0.5", "host:port"),
        ("head:0", "1..65535"),
        ("head:70000", "1..65535"),
        ("head:port", "1..65535"),
        (":6379", "host:port"),
        ("ray://head:10001", "Ray Client"),
        ("local", '""'),
        ("http://head:6379", "host:port"),
    ],
)
def test_a_bad_ray_address_is_refused_by_name(value, words):
    err = _error([f"simulation.ray_address={value}"])
    assert err.field == "simulation.ray_address" and words in err.reason


def test_ray_address_and_init_args_address_are_the_same_setting():
    for overrides in (
        ["simulation.ray_address=auto"],
        ['simulation.ray_init_args={address="auto"}'],
        ["simulation.ray_address=auto", 'simulation.ray_init_args={address="auto"}'],
    ):
        sim = load_config(None, overrides).simulation
        assert sim.cluster_address == "auto"
        assert ray_init_args(load_config(None, overrides))["address"] == "auto"
    sim = load_config(None, ["simulation.ray_address=10.0.0.5:6379"]).simulation
    assert sim.cluster_address == "10.0.0.5:6379"
    err = _error(["simulation.ray_address=auto", 'simulation.ray_init_args={address="h:1"}'])
    assert err.field == "simulation.ray_init_args.address" and "contradicts" in err.reason
    err = _error(["simulation.ray_init_args={address=6379}"])
    assert err.field == "simulation.ray_init_args.address"


def test_without_an_address_the_run_starts_its_own_ray():
    cfg = load_config(None, ["simulation.ray_init_args={num_cpus=2}"])
    assert cfg.simulation.cluster_address == ""
    args = ray_init_args(cfg)  # "local": never a cluster found through $RAY_ADDRESS
    assert args["address"] == "local" and args["num_cpus"] == 2


@pytest.mark.parametrize("key", ["num_cpus", "num_gpus", "object_store_memory"])
def test_a_cluster_s_node_resources_are_not_set_by_the_run(key):
    err = _error(["simulation.ray_address=auto", f"simulation.ray_init_args={{{key}=1}}"])
    assert err.field == f"simulation.ray_init_args.{key}"
    assert "simulation.num_cpus and simulation.num_gpus" in err.reason


def test_per_client_cpu_and_gpu_fractions_on_a_cluster_s_nodes():
    cfg = load_config(None, ["simulation.num_cpus=0.5", "simulation.num_gpus=0.25"])
    shares = client_resources(cfg)
    assert shares == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert clients_per_node({"CPU": 16.0, "GPU": 1.0}, shares) == 4  # 4 share the GPU
    assert clients_per_node({"CPU": 1.0, "GPU": 2.0}, shares) == 2  # CPU-bound
    assert clients_per_node({"CPU": 64.0}, shares) == 0  # a CPU-only node hosts none
    # unset, num_gpus follows the cluster's GPUs, not this machine's
    auto = load_config(None, ["simulation.ray_address=auto"])
    assert client_resources(auto, gpus_present=True)["num_gpus"] == 0.2
    assert client_resources(auto, gpus_present=False)["num_gpus"] == 0.0
    cpu = load_config(None, ["simulation.ray_address=auto", "device=cpu"])
    assert client_resources(cpu, gpus_present=True)["num_gpus"] == 0.0


def test_a_cluster_that_does_not_answer_fails_at_once():
    import ray

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        cfg = load_config(None, [f"simulation.ray_address={address}"])
        started = time.monotonic()
        with pytest.raises(RunFailed, match=f"no Ray cluster answers at {address}"):
            attach_cluster(cfg)
    assert time.monotonic() - started < 15  # ray.init alone retries for minutes
    assert not ray.is_initialized()


class InProcessGrid:
    """A Grid that hands each message to the ClientApp in this process; node id
    100 + i is client i. Keeps the messages it was given."""

    def __init__(self, app) -> None:
        self.app = app
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.sent.append(m)
            m.metadata.__dict__["_message_id"] = mid = f"m{len(self.sent)}"
            node = m.metadata.dst_node_id
            config = {"partition-id": node - 100}
            ctx = Context(1, node, config, RecordDict(), {})
            self.replies[mid] = self.app(m, ctx)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_carried_client_state_gives_the_in_process_numbers(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # what run_simulation sets
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = load_config(None, [*SMALL, "rounds=2", f"output_dir={tmp_path}"])
    data, path = prepare_federated_data(cfg)
    # the client side's own state folder stays unused: the state is in the messages
    job = FlowerJob(Federation(cfg, data), str(path), str(tmp_path / "client-side"))
    grid = InProcessGrid(make_client_app([job], {str(path): DataFile(str(path))}))
    server_side = DiskStateStore(tmp_path / "run" / "clients")
    nodes = [100 + c for c in range(cfg.clients.count)]
    carried = job.federation.run(FlowerTransport(grid, nodes, 60.0, states=server_side))
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert _students(carried) == _students(inline)
    assert [r.server_accuracy for r in carried] == [r.server_accuracy for r in inline]
    states = [
        m.content.config_records.get(f"state.{c}")
        for m in grid.sent
        for c in m.content.config_records["client"]["cids"]
    ]
    count = cfg.clients.count
    assert states[:count] == [None] * count  # round 1: nothing saved yet
    assert all(s is not None and len(s["blob"]) > 0 for s in states[count:])  # round 2
    for cid in range(count):  # kept where checkpoints and `fedkd resume` find them
        assert sorted(p.name for p in (tmp_path / "run" / "clients" / str(cid)).iterdir()) == [
            "r1.pt",
            "r2.pt",
        ]
    assert not (tmp_path / "client-side").exists()


# --- a real head node on loopback ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Processes in session ``sid`` (the head node's, started with its own session)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@dataclass
class Head:
    address: str
    process: subprocess.Popen
    node_tmp: Path  # the node's $TMPDIR (where clients copy the run's data)


@pytest.fixture
def ray_head():
    """A one-node Ray cluster (2 CPUs) on 127.0.0.1, with its own temp dir and free
    ports; afterwards its processes, found by session id, are all ended."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the head node's processes in /proc")
    root = Path(tempfile.mkdtemp(prefix="fkray-", dir="/tmp"))  # short: Ray's socket paths
    node_tmp = root / "tmp"
    node_tmp.mkdir()
    port = _free_port()
    cmd = [
        RAY, "start", "--head", "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={root / 'ray'}",
        f"--dashboard-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(node_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = (root / "head.log").open("w")
    head = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (root / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{(root / 'head.log').read_text()}")
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", head, node_tmp)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 30
        while (left := _session_members(head.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_members(head.pid):  # never `ray stop`: it ends every Ray here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes left after stopping the head: {left}"


def _cluster_answers(address: str) -> subprocess.CompletedProcess:
    """`ray status` of the cluster at ``address``, from a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [RAY, "status", f"--address={address}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.simulation
def test_a_run_attaches_to_a_running_cluster_and_leaves_it_running(ray_head, tmp_path):
    overrides = [
        *SMALL,
        "rounds=2",
        "baseline=false",
        f"output_dir={tmp_path}",
        f"simulation.ray_address={ray_head.address}",
        "simulation.round_timeout=300",
    ]
    started = time.monotonic()
    result = fedkd.run(None, overrides, quiet=True)
    took = time.monotonic() - started
    assert result.summary.status == "completed", result.summary.status
    assert [r.round for r in result.rounds] == [1, 2]
    # the clients ran on the cluster's workers, from the node's own copy of the data ...
    assert list((ray_head.node_tmp / "fedkd-data").glob("*.npz"))
    # ... and their state came back to the run folder, round by round
    for cid in range(4):
        names = sorted(p.name for p in (result.directory / "clients" / str(cid)).iterdir())
        assert names == ["r1.pt", "r2.pt"]
    # the same numbers as the in-process runner: no client lost or reused a stale state
    cfg = load_config(result.config)
    data, path = prepare_federated_data(cfg)
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert _students(result.rounds) == _students(inline)
    # the cluster is still up (only the run's connection to it ended)
    assert ray_head.process.poll() is None
    status = _cluster_answers(ray_head.address)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "2.0 CPU" in status.stdout
    print(f"attached run: {took:.1f} s")
    # a client that fits on no node is refused before the run starts
    import ray

    big = load_config(cfg, ["simulation.num_cpus=4"])
    try:
        with pytest.raises(RunFailed, match="can host a client needing 4 CPUs"):
            attach_cluster(big)
    finally:
        ray.shutdown()
    assert ray_head.process.poll() is None
