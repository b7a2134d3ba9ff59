"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedkd.results import Outcome, read_rounds, read_summary
from tests.conftest import SMALL


def _fedkd(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedkd.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("partition.alpha=0", "partition.alpha"),
        ("strategy.temperature=-1", "strategy.temperature"),
        ("rounds=-2", "rounds"),
        ("clients.count=5000", "clients.count"),
        ("clients.models=['mlp','resnet9000']", "unknown model 'resnet9000'"),
        ("strategy.name=fedmagic", "unknown strategy 'fedmagic'"),
        ("data.dataset=imagenet", "unknown dataset 'imagenet'"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(override, field, tmp_path):
    start = time.monotonic()
    proc = _fedkd("run", "simulations/quickstart.toml", override, f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert field in proc.stderr
    assert "known:" in proc.stderr or ":" in proc.stderr
    assert time.monotonic() - start < 30, "must fail before Ray starts"
    assert not any(tmp_path.iterdir()), "no run directory for a rejected config"


def test_list_shows_registered_plugins():
    proc = _fedkd("list")
    assert proc.returncode == 0
    for name in ("kd", "local", "mlp", "cnn1d", "mnist1d", "dirichlet", "soft_kl"):
        assert name in proc.stdout


@pytest.mark.simulation
def test_fedkd_run_with_overrides_prints_progress_and_summary(tmp_path):
    proc = _fedkd(
        "run", "simulations/quickstart.toml", *SMALL, "rounds=2", f"output_dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round   2/2 | server" in proc.stdout
    assert "students, local-only" in proc.stdout and "% teacher" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    summary = read_summary(run_dir)
    assert summary.rounds_completed == 2 and summary.status == "completed"
    assert summary.outcome is Outcome.COMPLETED
    assert [r.round for r in read_rounds(run_dir / "metrics.jsonl")] == [1, 2]


def test_bench_help_lists_its_options():
    proc = _fedkd("bench", "--help")
    assert proc.returncode == 0 and "--repeats" in proc.stdout
