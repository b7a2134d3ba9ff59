"""fedkd reproduce: the twins load and name real runs and metrics, claims are judged
on paired seeds, and the command runs a twin end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedkd.config import ConfigError
from fedkd.reproduce import ROOT, Claim, Reproduction, judge, load_twin, twins
from fedkd.results.records import Outcome
from tests.test_seeds import _summary


def test_every_twin_loads_and_points_at_existing_configs():
    found = twins()
    assert {"fedmd", "feddf", "dsfl", "fd", "cfd", "cronus", "pate"} <= set(found)
    for twin in found.values():
        assert twin.claims, twin.name
        for run in twin.runs:
            assert (ROOT / run.config).is_file(), (twin.name, run.config)
        for config in twin.configs:
            assert (ROOT / config).is_file(), (twin.name, config)


@pytest.mark.parametrize(
    ("claim", "where"),
    [
        ('text = "x"\na = "r:students"\nb = "nope:students"', "claims[0].b"),
        ('text = "x"\na = "r:speed"\nb = "r:students"', "claims[0].a"),
        ('text = "x"\nkind = "bigger"\na = "r:students"\nb = "r:students"', "claims[0].kind"),
    ],
)
def test_a_bad_twin_names_the_key(tmp_path: Path, claim: str, where: str):
    path = tmp_path / "t.toml"
    path.write_text(f'[runs.r]\nconfig = "x.toml"\n\n[[claims]]\n{claim}\n')
    with pytest.raises(ConfigError) as err:
        load_twin(path)
    assert where in err.value.field


def _results(a: list[float], b: list[float]):
    return {
        "a": {s: _summary(v) for s, v in enumerate(a)},
        "b": {s: _summary(v) for s, v in enumerate(b)},
    }


def test_greater_needs_the_interval_of_the_paired_difference_above_zero():
    claim = Claim("b beats a", "greater", "a:students", "b:students")
    clear = judge(claim, _results([0.30, 0.31, 0.32], [0.35, 0.37, 0.36]))
    assert clear.holds is True and clear.diff is not None and clear.diff.ci[0] > 0
    noisy = judge(claim, _results([0.30, 0.31, 0.32], [0.36, 0.29, 0.33]))
    assert noisy.holds is False and "includes 0" in noisy.why


def test_at_least_and_fewer():
    within = Claim("b close to a", "at_least", "a:students", "b:students", margin=0.01)
    assert judge(within, _results([0.40, 0.40], [0.395, 0.392])).holds is True
    assert judge(within, _results([0.40, 0.40], [0.38, 0.37])).holds is False
    fewer = Claim("b sends less", "fewer", "a:bytes_per_round", "b:bytes_per_round", factor=10)
    verdict = judge(fewer, _results([0.4, 0.4], [0.4, 0.4]))  # same bytes: ratio 1
    assert verdict.holds is False and "A / B = 1.0" in verdict.why


def test_a_claim_without_values_is_not_checked_and_the_exit_code_says_so():
    claim = Claim("x", "greater", "a:transfer", "b:students")  # no transfer baseline ran
    verdict = judge(claim, _results([0.3], [0.4]))
    assert verdict.holds is None and verdict.label == "not checked"
    rep = Reproduction(Path("."), {"p": [verdict]})
    assert rep.exit_code == 2
    ok = judge(Claim("y", "greater", "a:students", "b:students"), _results([0.3, 0.3], [0.5, 0.52]))
    assert Reproduction(Path("."), {"p": [ok]}).exit_code == 0
    bad = judge(
        Claim("z", "greater", "b:students", "a:students"), _results([0.3, 0.3], [0.5, 0.52])
    )
    assert Reproduction(Path("."), {"p": [ok, bad]}).exit_code == 1


def test_fedkd_reproduce_lists_the_papers_and_refuses_unknown_ones():
    cmd = [sys.executable, "-m", "fedkd.cli", "reproduce"]
    listed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "fedmd" in listed.stdout and "claim:" in listed.stdout
    bad = subprocess.run([*cmd, "fedxx", "--offline"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "fedxx" in bad.stderr


@pytest.mark.slow
@pytest.mark.simulation
def test_reproduce_runs_a_twin_and_writes_the_claim_table(tmp_path: Path):
    cmd = [sys.executable, "-m", "fedkd.cli", "reproduce", "fd", "--offline", "--quick"]
    proc = subprocess.run(
        [*cmd, "--seeds", "[0,1]", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    table = (tmp_path / "claims.md").read_text()
    assert "FD beats local-only training" in table
    assert "**holds**" in table or "**does not hold**" in table  # (3 rounds: either)
    assert (tmp_path / "claims.csv").is_file() and (tmp_path / "fd.png").is_file()
    assert Outcome.COMPLETED.value in proc.stdout
