"""simulations/compare.py: every algorithm on one setting, table and plot on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]


def _compare(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "simulations" / "compare.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_unknown_algorithm_is_named(tmp_path):
    proc = _compare("--algorithms", "fd,fedmagic", "--out", str(tmp_path))
    assert proc.returncode == 2 and "fedmagic" in proc.stderr


@pytest.mark.slow
@pytest.mark.simulation
def test_compare_writes_table_json_and_plot(tmp_path):
    proc = _compare(
        "--algorithms", "fd,cfd", "--seeds", "2", "--out", str(tmp_path), *SMALL, "rounds=2"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "comparison.json").read_text())
    rows = {r["algorithm"]: r for r in data["rows"]}
    assert set(rows) == {"fd", "cfd"}
    for r in rows.values():
        assert len(r["curve"]) == 2 and r["students"][0] > 0.1 and r["seeds"] == [0, 1]
        assert r["gain_points"][0] is not None  # each run's own local-only baseline
    assert rows["fd"]["bytes_per_round"] < rows["cfd"]["bytes_per_round"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| fd |" in table and "| cfd |" in table and "4 clients" in table
    assert "mean +- std over seeds [0, 1]" in table and " +- " in table
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
