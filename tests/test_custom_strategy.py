"""The "Write your own strategy" page: its code is the example's, and the example runs.

The user's module lives outside the package (examples/custom_strategy/my_lab) and is
loaded by import path in a real Flower + Ray simulation started from the CLI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedkd.results import Outcome, read_rounds, read_summary

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_strategy"
PAGE = ROOT / "docs" / "write_your_own_strategy.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_page_shows_the_example_files_verbatim():
    assert (EXAMPLE / "my_lab" / "algos.py").read_text() in _blocks("python")
    assert (EXAMPLE / "experiment.toml").read_text() in _blocks("toml")


def test_inline_snippet_on_the_page_runs(tmp_path, monkeypatch):
    snippet = _blocks("python")[-1]
    assert "InlineTransport" in snippet
    monkeypatch.chdir(EXAMPLE)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    snippet = snippet.replace(
        'load_config("experiment.toml")',
        (f'load_config("experiment.toml", ["rounds=1", "output_dir={tmp_path}"])'),
    )
    exec(compile(snippet, str(PAGE), "exec"), {})


@pytest.mark.slow
@pytest.mark.simulation
def test_user_strategy_from_outside_the_package_runs_under_flower(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedkd.cli",
            "run",
            "experiment.toml",
            "-q",
            f"output_dir={tmp_path}",
        ],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    summary = read_summary(run_dir)
    assert summary.status == "completed" and summary.rounds_completed == 3
    assert summary.outcome is Outcome.COMPLETED
    assert summary.strategy.startswith("my_lab.algos:MedianKD")
    assert summary.failures.count == 0
    records = read_rounds(run_dir / "metrics.jsonl")
    assert all(len(r.clients) == 5 for r in records)
    assert records[-1].server_accuracy > 0.15


@pytest.mark.slow
@pytest.mark.simulation
def test_user_payload_kind_travels_both_ways_under_flower(tmp_path):
    import fedkd
    from fedkd.config import load_config
    from tests.conftest import SMALL

    cfg = load_config(
        None,
        [
            *SMALL,
            "rounds=2",
            "baseline=false",
            f"output_dir={tmp_path}",
            "strategy.name=tests.custom_payload:PluralityServer",
        ],
    )
    result = fedkd.run(cfg, quiet=True)
    assert result.summary.status == "completed"
    for r in result.rounds:
        assert r.failures == () and r.students.count == 4
        # 400 public samples x int16 per client (indices are derived, not counted)
        assert all(c.bytes_up == 400 * 2 for c in r.clients.values())
    assert [r.bytes_down for r in result.rounds] == [4 * 400 * 2] * 2  # votes both rounds
