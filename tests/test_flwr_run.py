"""fedkd as a Flower app (``flwr run .``; docs/flwr_run.md).

The fast tests check that ``pyproject.toml``'s ``[tool.flwr.app]`` passes Flower's own
loader and names importable apps, that the run config becomes the fedkd config, and
that the app bundles (FAB) within Flower's limits. The slow test runs Flower's CLI,
``flwr run . --stream``, on its local simulation federation for 2 rounds, with a
private HOME and FLWR_HOME and its own SuperLink ports, checks the run folder against
fedkd's in-process runner, and ends the SuperLink (and anything else started under
that FLWR_HOME) by process id.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.flower import flower_nodes
from fedkd.flwr_app import APP_DIR, config_from_run_config
from fedkd.inline import InlineTransport
from fedkd.results import read_rounds, read_summary
from tests.conftest import SMALL
from tests.test_ray_cluster import _students

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_is_a_valid_flower_app_with_importable_apps():
    from flwr.cli.config_utils import load_and_validate
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    config, warnings = load_and_validate(ROOT / "pyproject.toml", check_module=True)
    assert warnings == []
    app = config["tool"]["flwr"]["app"]
    assert app["publisher"] == "fedkd"
    assert isinstance(load_app(app["components"]["serverapp"], ValueError, ROOT), ServerApp)
    assert isinstance(load_app(app["components"]["clientapp"], ValueError, ROOT), ClientApp)
    assert set(app["config"]) == {"fedkd-config", "overrides"}
    assert APP_DIR == ROOT


def test_run_config_becomes_the_fedkd_config(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(ROOT / "pyproject.toml", check_module=False)
    default = dict(config["tool"]["flwr"]["app"]["config"])
    assert config_from_run_config(default) == load_config(ROOT / default["fedkd-config"])
    overrides = [*SMALL, "clients.models=['mlp','cnn1d']", f"output_dir={tmp_path}"]
    cfg = config_from_run_config({**default, "overrides": " ".join(overrides)})
    assert cfg == load_config(ROOT / "simulations/quickstart.toml", overrides)
    assert config_from_run_config({"fedkd-config": "", "overrides": ""}) == load_config(None)
    own = tmp_path / "own.toml"
    own.write_text("rounds = 4\n")
    assert config_from_run_config({"fedkd-config": str(own)}).rounds == 4
    with pytest.raises(ConfigError, match="seeds"):
        config_from_run_config({"overrides": "seeds=[1,2]"})
    with pytest.raises(ConfigError, match="no such config file"):
        config_from_run_config({"fedkd-config": "simulations/missing.toml"})


def test_the_app_bundles_within_flowers_limits():
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    assert len(fab) < FAB_MAX_SIZE
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"fedkd/flwr_app.py", "fedkd/flower.py", "simulations/quickstart.toml"} <= names
    assert not any(n.startswith((".venv/", "runs/")) for n in names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_under(flwr_home: Path) -> list[int]:
    """Processes (not this one) whose environment names ``flwr_home`` as FLWR_HOME:
    the SuperLink ``flwr run`` started, and whatever it started in turn."""
    tag = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _end(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.simulation
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to clean up")
def test_flwr_run_runs_two_rounds_on_the_local_simulation(tmp_path):
    out = tmp_path / "runs"
    fedkd_overrides = [
        *SMALL, "rounds=2", "clients.fraction=0.5", "baseline=false", "privacy.audit=false",
        f"output_dir={out}",
    ]  # fmt: skip
    cfg = load_config(ROOT / "simulations/quickstart.toml", fedkd_overrides)
    nodes = flower_nodes(cfg)
    assert nodes == 2  # fewer SuperNodes than clients: each serves whichever a message names
    flwr_home = tmp_path / "flwr-home"
    (tmp_path / "home").mkdir()
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path / "home"),
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # use this environment as it is
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )  # FEDKD_CACHE_DIR: the test session's (conftest)
    command = [
        str(Path(sys.executable).with_name("flwr")), "run", ".", "--stream",
        "--federation-config", f"num-supernodes={nodes}",
        "--run-config", f'overrides="{" ".join(fedkd_overrides)}"',
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        _end(_pids_under(flwr_home))
    seconds = time.monotonic() - t0
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "status: completed" in output, output[-4000:]
    assert not _pids_under(flwr_home)
    (folder,) = out.iterdir()
    assert read_summary(folder).status == "completed"
    flower = read_rounds(folder / "metrics.jsonl")
    assert [r.round for r in flower] == [1, 2]
    data, path = prepare_federated_data(cfg)
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert [sorted(r.clients) for r in flower] == [sorted(r.clients) for r in inline]
    assert _students(flower) == _students(inline)
    assert [r.server_accuracy for r in flower] == [r.server_accuracy for r in inline]
    print(f"flwr run: {seconds:.1f} s")
