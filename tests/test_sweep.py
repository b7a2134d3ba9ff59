"""``fedkd.run_many``: several experiments under one Flower simulation and one Ray start.

Each experiment must give exactly the numbers it gives alone, land in its own run
folder with its own summary, and a bad config anywhere must stop the sweep before Ray
starts, naming the experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.results import read_rounds, read_summary
from fedkd.runner import RunResult, SeedsResult
from fedkd.sweep import _engine_groups, run_many
from tests.conftest import SMALL
from tests.test_resume import _numbers

BASE = [*SMALL, "rounds=2", "privacy.audit=false", "baseline=false"]

#: three experiments of different shapes: another strategy, another client count and
#: sampling, and a multi-seed one
EXPERIMENTS = [
    (None, [*BASE, "name=kd4"]),
    (
        "simulations/fedmd.toml",
        [*BASE, "clients.count=6", "clients.fraction=0.5", "server.public_subset=200", "name=md6"],
    ),
    (None, [*BASE, "seeds=[0,1]", "name=seeds"]),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    import ray

    out = tmp_path_factory.mktemp("sweep")
    starts: list[dict] = []
    real_init = ray.init

    def counting_init(*args, **kwargs):  # counts Ray starts; the real one runs
        starts.append(kwargs)
        return real_init(*args, **kwargs)

    seen: list[tuple[int, float]] = []  # (experiment, when its result was reported)
    ray.init = counting_init
    try:
        results = run_many(
            [(c, [*o, f"output_dir={out}"]) for c, o in EXPERIMENTS],
            quiet=True,
            on_result=lambda i, r: seen.append((i, time.time())),
        )
    finally:
        ray.init = real_init
    return results, starts, seen


def _alone(config: str | None, overrides: list[str]) -> list:
    """The experiment's numbers run in this process, without Flower."""
    cfg = load_config(config, overrides)
    data, path = prepare_federated_data(cfg)
    return _numbers(Federation(cfg, data).run(InlineTransport(cfg, str(path))))


@pytest.mark.simulation
def test_a_sweep_starts_ray_once_and_finishes_each_experiment_in_order(sweep):
    results, starts, seen = sweep
    assert len(starts) == 1
    assert [i for i, _ in seen] == [0, 1, 2]
    # each experiment is finished and reported before the next one's rounds start
    for (_, reported), later in zip(seen[:2], results[1:], strict=True):
        runs = later.runs.values() if isinstance(later, SeedsResult) else [later]
        assert all(reported < r.summary.timing["rounds_started_at"] for r in runs)
    assert [type(r) for r in results] == [RunResult, RunResult, SeedsResult]
    assert [r.exit_code for r in results] == [0, 0, 0]
    folders = [r.directory for r in results]
    assert len(set(folders)) == 3
    assert [Path(f).name.split("-")[0] for f in folders] == ["kd4", "md6", "seeds"]
    for folder in folders[:2]:
        assert read_summary(folder).status == "completed"
    assert sorted(p.name for p in folders[2].iterdir() if p.is_dir()) == ["seed-0", "seed-1"]
    assert results[0].summary.timing["startup_s"] > 0  # the shared start-up is counted once
    assert "startup_s" in results[1].summary.timing


@pytest.mark.simulation
def test_each_experiment_of_a_sweep_gives_its_numbers_alone(sweep):
    results, _, _ = sweep
    for (config, overrides), result in zip(EXPERIMENTS[:2], results[:2], strict=True):
        assert _numbers(result.rounds) == _alone(config, overrides), overrides[-1]
    assert read_summary(results[1].directory).clients == 6
    seeds = results[2]
    assert isinstance(seeds, SeedsResult)
    one = read_rounds(seeds.directory / "seed-1" / "metrics.jsonl")
    assert _numbers(one) == _alone(None, [*BASE, "seed=1"])


@pytest.mark.simulation
def test_an_on_result_that_raises_stops_the_sweep_and_is_re_raised(tmp_path: Path):
    class Enough(Exception):
        pass

    def stop_after_first(i: int, result) -> None:
        raise Enough(f"experiment {i} ended {result.summary.status}")

    runs = [(None, [*BASE, "rounds=1", f"output_dir={tmp_path}", f"name=e{i}"]) for i in (0, 1)]
    with pytest.raises(Enough, match="experiment 0 ended completed"):
        run_many(runs, quiet=True, on_result=stop_after_first)
    (first,) = tmp_path.glob("e0-*")
    (second,) = tmp_path.glob("e1-*")
    assert read_summary(first).status == "completed"
    assert not (second / "summary.json").exists()  # never started: only its config
    assert (second / "config.toml").is_file()


def test_a_bad_experiment_stops_the_sweep_before_anything_runs(tmp_path: Path):
    good = (None, [*BASE, f"output_dir={tmp_path}"])
    bad = (None, [*BASE, f"output_dir={tmp_path}", "clients.lr=-1"])
    with pytest.raises(ConfigError) as err:
        run_many([good, bad], quiet=True)
    assert "experiment 2 of 2" in str(err.value)
    assert err.value.field == "clients.lr"
    assert list(tmp_path.iterdir()) == []  # no run folder made, nothing started


def test_an_experiment_is_a_config_or_a_config_and_its_overrides(tmp_path: Path):
    with pytest.raises(ConfigError, match="experiment 1 of 1: give a config or a"):
        run_many([(None, "rounds=2")], quiet=True)  # overrides must be a list
    with pytest.raises(ConfigError, match="clients.count: experiment 2 of 2"):
        run_many([None, [None, ["clients.count=0"]]], quiet=True)  # a list pair (JSON's)


def test_experiments_run_under_one_start_while_they_share_the_engine():
    class P:  # the one attribute _engine_groups reads
        def __init__(self, *overrides: str) -> None:
            self.config = load_config(None, list(overrides))

    plans = [P(), P("clients.count=7", "strategy.name=fedmd"), P("simulation.num_cpus=2"), P()]
    groups = _engine_groups(plans)  # type: ignore[arg-type]
    assert [len(g) for g in groups] == [2, 1, 1]


def test_run_flower_jobs_refuses_jobs_that_do_not_share_the_engine(tmp_path: Path):
    from fedkd.flower import FlowerJob, run_flower_jobs

    def job(*overrides: str) -> FlowerJob:
        cfg = load_config(None, [*BASE, *overrides])
        data, path = prepare_federated_data(cfg)
        return FlowerJob(Federation(cfg, data), str(path), str(tmp_path))

    with pytest.raises(ValueError, match="does not share the engine"):
        run_flower_jobs([job(), job("simulation.num_cpus=2")])


@pytest.mark.slow
@pytest.mark.simulation
def test_ctrl_c_leaves_finished_experiments_as_they_ended(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    common = [*SMALL, "privacy.audit=false", f"output_dir={tmp_path}"]
    runs = [
        (None, [*common, "rounds=2", "name=first"]),
        (None, [*common, "rounds=30", "name=long"]),
    ]
    code = (
        "import json, sys, fedkd\n"
        "try:\n"
        "    fedkd.run_many([tuple(r) for r in json.loads(sys.argv[1])], quiet=True)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(runs)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group, like a terminal's foreground job
    )
    deadline = time.monotonic() + 240
    metrics = None
    while time.monotonic() < deadline and metrics is None:
        for found in tmp_path.glob("long-*/metrics.jsonl"):
            if len(found.read_text().splitlines()) >= 2:
                metrics = found
        time.sleep(0.2)
    assert metrics is not None, "the second experiment never finished two rounds"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-2000:]
    (first,) = tmp_path.glob("first-*")
    assert read_summary(first).status == "completed"  # finished before: as it ended
    assert (first / "baseline.jsonl").is_file()  # its local-only baseline ran
    long = read_summary(metrics.parent)
    assert long.outcome.value == "interrupted" and 2 <= long.rounds_completed < 30


def _fedkd(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "fedkd.cli", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.simulation
def test_fedkd_run_with_several_configs_runs_them_under_one_start(tmp_path: Path):
    configs = ["simulations/quickstart.toml", "simulations/fedmd.toml"]
    overrides = [*BASE, "rounds=1", "server.public_subset=200", f"output_dir={tmp_path}"]
    proc = _fedkd("run", *configs, *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fedkd: each experiment (one Ray start):" in proc.stdout
    for config in configs:
        assert f"  {config}: completed (" in proc.stdout
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["fedmd", "quickstart"]


def test_fedkd_run_with_a_bad_second_config_says_which_before_anything_runs(tmp_path: Path):
    configs = ["simulations/quickstart.toml", "simulations/fedmd.toml"]
    proc = _fedkd("run", *configs, *BASE, f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "experiment 2 of 2 (simulations/fedmd.toml)" in proc.stderr  # its public_subset
    assert list(tmp_path.iterdir()) == []
