"""Multi-seed runs and paired comparisons: the statistics, the run folder, and that each
seed of a multi-seed run is exactly the single run with that seed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.results import read_rounds, read_summary
from fedkd.results.records import Outcome
from fedkd.results.seeds import (
    SeedsSummary,
    Spread,
    compare,
    comparison_table,
    read_seeds,
)
from tests.conftest import SMALL
from tests.test_resume import _numbers

# --- statistics ---------------------------------------------------------------------------


def test_spread_is_mean_sample_std_and_a_t_interval():
    values = [0.30, 0.32, 0.35, 0.33, 0.31]
    s = Spread.of([0, 1, 2, 3, 4], values)
    assert s is not None
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert s.mean == pytest.approx(mean) and s.std == pytest.approx(std)
    half = 2.7764451 * std / math.sqrt(5)  # t(0.975, 4 df), from the tables
    assert s.ci == pytest.approx((mean - half, mean + half))
    assert s.describe() == f"32.2 +- {100 * std:.1f}% (95% CI {100 * (mean - half):.1f} to " + (
        f"{100 * (mean + half):.1f}, n=5)"
    )


def test_seeds_without_a_value_are_left_out_and_one_seed_has_no_interval():
    s = Spread.of([0, 1, 2], [0.5, None, 0.7])
    assert s is not None and s.seeds == (0, 2) and s.n == 2
    one = Spread.of([4], [0.5])
    assert one is not None and one.std == 0.0 and one.ci is None
    assert "n=1" in one.describe()
    assert Spread.of([0], [None]) is None


def test_seeds_config_takes_a_count_or_a_list():
    assert load_config(None, ["seeds=5"]).seeds == [0, 1, 2, 3, 4]
    assert load_config(None, ["seeds=[3,8,21]"]).seeds == [3, 8, 21]
    assert load_config(None, []).seeds == []
    for bad in ("seeds=-1", "seeds=[1,1]", "seeds=[2,-3]"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [bad])
        assert err.value.field == "seeds"


# --- a multi-seed run under Flower + Ray ---------------------------------------------------

SEEDS = [
    *SMALL,
    "rounds=2",
    "seeds=[0,1]",
    "privacy.audit=false",
    'baseline=["local","centralised"]',
]


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory: pytest.TempPathFactory):
    import fedkd

    out = tmp_path_factory.mktemp("seeds")
    return fedkd.run(None, [*SEEDS, f"output_dir={out}"], quiet=True)


@pytest.mark.simulation
def test_a_multi_seed_run_writes_each_seed_and_the_statistics(seeds_run):
    run = seeds_run.directory
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["seed-0", "seed-1"]
    for seed in (0, 1):
        child = run / f"seed-{seed}"
        assert read_summary(child).status == "completed"
        assert [r.round for r in read_rounds(child / "metrics.jsonl")] == [1, 2]
        assert f"seed = {seed}" in (child / "config.toml").read_text()
    data = json.loads((run / "summary.json").read_text())
    summary = SeedsSummary.from_json(data)
    assert summary.outcome is Outcome.COMPLETED and summary.seeds == (0, 1)
    students = summary.metrics["students"]
    per_seed = [read_summary(run / f"seed-{s}").final.students.mean for s in (0, 1)]
    assert list(students.values) == pytest.approx(per_seed) and students.n == 2
    assert students.ci is not None
    rows = list(csv.DictReader((run / "seeds.csv").open()))
    assert [r["seed"] for r in rows] == ["0", "1"]
    assert float(rows[1]["students"]) == pytest.approx(per_seed[1], rel=1e-5)
    assert (run / "accuracy.png").stat().st_size > 0
    assert seeds_run.exit_code == 0
    assert summary.metrics["centralised"].n == 2  # a baseline beside the federated result
    assert (run / "seed-0" / "baseline-centralised.jsonl").is_file()


@pytest.mark.simulation
def test_each_seed_is_the_single_run_with_that_seed(seeds_run):
    """Seed 1 of the multi-seed run gives the numbers a run with seed=1 alone gives."""
    cfg = load_config(None, [*SEEDS, "seeds=[]", "seed=1"])
    data, path = prepare_federated_data(cfg)
    alone = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    records = read_rounds(seeds_run.directory / "seed-1" / "metrics.jsonl")
    assert _numbers(records) == _numbers(alone)


@pytest.mark.simulation
def test_compare_pairs_seeds_and_says_when_a_difference_is_not_significant(
    seeds_run, capsys, tmp_path: Path
):
    from fedkd.cli import main

    run = seeds_run.directory
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp.txt")]) == 0
    out = (tmp_path / "cmp.txt").read_text()  # (what it printed too)
    assert "paired seeds: [0, 1]" in out and "not significant" in out
    # a single run folder pairs by its config's seed
    assert main(["compare", str(run), str(run / "seed-1"), "--out", str(tmp_path / "1.txt")]) == 0
    assert "paired seeds: [1]" in (tmp_path / "1.txt").read_text()
    assert main(["compare", str(run)]) == 2
    assert main(["compare", str(run), str(tmp_path / "nowhere")]) == 2


def test_compare_reports_a_consistent_difference_as_significant():
    a = {s: _summary(0.30 + 0.01 * s) for s in range(5)}
    b = {s: _summary(0.35 + 0.01 * s + (0.002 if s % 2 else -0.002)) for s in range(6)}
    (students,) = [d for d in compare(a, b) if d.metric == "students"]
    assert students.diff.seeds == (0, 1, 2, 3, 4)  # seed 5 has no partner
    assert students.diff.mean == pytest.approx(0.05 + 0.0004, abs=1e-3)
    assert students.significant is True and students.verdict() == "B higher"
    text = comparison_table("A", "B", compare(a, b))
    assert "B - A  +5.0 +- 0.2 points" in text


def test_the_overall_outcome_is_the_worst_and_names_the_seeds():
    ok, bad = _summary(0.3), _summary(0.3, Outcome.FAILED, "failed: round 1: boom")
    s = SeedsSummary.of("x", {0: ok, 1: bad, 2: ok})
    assert s.outcome is Outcome.FAILED and "seed 1: failed: round 1: boom" in s.status
    assert s.exit_code == 1
    cut = SeedsSummary.of("x", {0: ok, 1: None})
    assert cut.outcome is Outcome.INTERRUPTED and "seeds [1] not run" in cut.status
    assert SeedsSummary.of("x", {0: ok, 1: ok}).status == "completed (2 seeds)"


def test_read_seeds_of_a_folder_without_seeds_is_its_own_seed(seeds_run_free_folder):
    assert list(read_seeds(seeds_run_free_folder)) == [7]


@pytest.fixture
def seeds_run_free_folder(tmp_path: Path) -> Path:
    summary = _summary(0.4)
    (tmp_path / "config.toml").write_text("seed = 7\n")
    (tmp_path / "summary.json").write_text(json.dumps(summary.to_json()))
    return tmp_path


def _summary(students: float, outcome: Outcome = Outcome.COMPLETED, status: str = ""):
    """A RunSummary with the given students' mean (the rest from a real summary's shape)."""
    from fedkd.results.records import (
        Communication,
        Failures,
        Final,
        RunSummary,
        Stats,
    )

    return RunSummary(
        name="t",
        outcome=outcome,
        status=status or outcome.value,
        rounds=1,
        rounds_completed=1,
        strategy="kd",
        clients=2,
        data="d",
        evaluation="e",
        final=Final(Stats(students, students, students, 2), None, None, None, None),
        architectures=(),
        communication=Communication(10, 10, 20.0, 100, 100.0, 0.2),
        timing={"rounds_s": 1.0},
        failures=Failures(),
    )


@pytest.mark.simulation
def test_resume_of_a_multi_seed_run_finishes_the_seeds_that_had_not_ended(
    seeds_run, tmp_path: Path
):
    import shutil

    from fedkd.runner import resume

    copy = tmp_path / "run"
    shutil.copytree(seeds_run.directory, copy)
    (copy / "seed-1" / "summary.json").unlink()  # as if killed before seed 1's summary
    (copy / "summary.json").unlink()
    result = resume(copy, quiet=True)
    assert result.summary.outcome is Outcome.COMPLETED
    assert read_summary(copy / "seed-1").resumed_from == 2
    for name in ("baseline.jsonl", "baseline-centralised.jsonl"):  # rerun, not appended twice
        assert [r.round for r in read_rounds(copy / "seed-1" / name)] == [1, 2], name
    again = SeedsSummary.from_json(json.loads((copy / "summary.json").read_text()))
    before = seeds_run.summary.metrics["students"].values
    assert again.metrics["students"].values == pytest.approx(before)
