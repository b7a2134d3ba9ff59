"""fedkd bench compares like with like: the plain loop does the work fedkd's runtime does
(the same accuracies, round by round: exactly, or within a tolerance where fedkd
vectorises), the audit is on both sides or on neither, and --scaling sets each fedkd
variant's way of running clients itself."""

from __future__ import annotations

import time

import pytest

from fedkd.bench import (
    MIRRORED,
    TOLERANCE,
    VARIANTS,
    _both_sides,
    _tolerance,
    main,
    plain_loop,
    refuse_variant_overrides,
    row_overrides,
    same_accuracies,
    variant_overrides,
)
from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from tests.conftest import SMALL


@pytest.mark.parametrize("audit", [False, True])
def test_the_plain_loop_reproduces_the_runtime_round_by_round(tmp_path, audit):
    overrides = _both_sides([*SMALL, "rounds=2", f"output_dir={tmp_path}"], audit)
    cfg = load_config(None, overrides)
    assert cfg.strategy.name == MIRRORED and cfg.privacy.audit is audit
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    federation.run(InlineTransport(cfg, str(path)))
    runtime = [[r.clients[c].accuracy for c in sorted(r.clients)] for r in federation.records]
    plain = plain_loop(overrides, time.time())
    assert plain["accuracies"] == runtime
    assert len(plain["round_s"]) == 2 and plain["startup_s"] >= 0


@pytest.mark.parametrize("override", ["strategy=fd", "strategy.name=fd", "privacy.audit=true"])
def test_the_benchmark_owns_the_strategy_and_the_audit(override):
    with pytest.raises(SystemExit, match="set by the benchmark"):
        _both_sides([override], audit=False)


def test_exact_accuracies_must_match_bit_for_bit():
    runs = [[[0.5, 0.25], [0.625, 0.5]]]
    assert same_accuracies(runs, [[[0.5, 0.25], [0.625, 0.5]]]) == (True, "yes")
    assert same_accuracies(runs, [[[0.5, 0.25], [0.625, 0.5 + 1e-9]]]) == (False, "NO")
    assert same_accuracies(runs, [[[0.5, 0.25]]]) == (False, "NO")  # a round missing
    assert same_accuracies(runs, [[[0.5], [0.625, 0.5]]]) == (False, "NO")  # a client missing


def test_vectorised_accuracies_match_by_round_means_and_report_the_largest_gaps():
    fed = [[[0.5, 0.25], [0.625, 0.5]], [[0.5, 0.25], [0.625, 0.5]]]
    plain = [[[0.501, 0.25], [0.625, 0.5]], [[0.5, 0.253], [0.625, 0.5]]]
    assert same_accuracies(fed, plain, 0.005) == (
        True,
        "round means within 0.005 (vectorised: largest 0.0015; one client's: 0.003)",
    )
    plain[1][1] = [0.645, 0.49]  # one client 0.02 off, the round's mean 0.005
    assert same_accuracies(fed, plain, 0.005)[0] is True
    plain[1][1] = [0.645, 0.5]  # the round's mean 0.01 off
    assert same_accuracies(fed, plain, 0.005) == (
        False,
        "NO, round means not within 0.005 (vectorised: largest 0.0100; one client's: 0.020)",
    )
    assert same_accuracies(fed, [[[0.5, 0.25]]], 0.005)[0] is False


def test_the_tolerance_applies_only_where_the_fedkd_side_vectorises():
    assert _tolerance(["rounds=2"]) == 0.0
    assert _tolerance(["simulation.vectorize=false"]) == 0.0
    assert _tolerance(["simulation.vectorize=true"]) == TOLERANCE
    assert _tolerance(["simulation={vectorize=true}"]) == TOLERANCE


@pytest.mark.parametrize(
    "override",
    [
        "simulation.clients_per_message=4",
        "simulation.vectorize=true",
        "simulation.vectorize=false",
        "simulation={clients_per_message=2}",
    ],
)
def test_the_scaling_mode_owns_how_fedkd_runs_its_clients(override):
    with pytest.raises(SystemExit, match="set by each variant.*--variants"):
        refuse_variant_overrides(["rounds=2", override])
    with pytest.raises(SystemExit, match="set by each variant"):  # before running anything
        main(["--scaling", "--clients", "20", override])
    refuse_variant_overrides(["simulation.threads=2", "simulation.num_cpus=1"])  # others pass


def test_the_sweep_mode_keeps_no_figures_file_and_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["--sweep", "--out", "somewhere"])
    assert "--out is for the plain comparison and --scaling" in capsys.readouterr().err


def test_variants_are_chosen_by_name_and_only_for_the_scaling_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--scaling", "--variants", "per-client,bogus"])
    assert "bogus: choose from per-client, actor, vectorised" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--variants", "actor"])
    assert "--variants needs --scaling" in capsys.readouterr().err


@pytest.mark.parametrize(("per_round", "per_worker"), [(10, 3), (100, 25)])
def test_each_variant_of_a_scaling_row_sets_how_fedkd_runs_the_round(per_round, per_worker):
    from fedkd.assignment import clients_per_message, clients_per_round

    user = ["simulation.ray_init_args.num_cpus=4"]  # 4 workers at once
    row = row_overrides(user, 1000, per_round, 2, audit=False)
    cfg = load_config(None, row)
    assert clients_per_round(cfg) == per_round and cfg.rounds == 2
    assert cfg.strategy.name == MIRRORED and cfg.partition.name == "iid"
    expected = {"per-client": (1, False), "actor": (per_worker, False), "vectorised": (0, True)}
    for name, (k, vectorize) in expected.items():
        overrides = variant_overrides(row, name)
        assert overrides[: len(row)] == row  # the row's own overrides, then the variant's
        sim = load_config(None, overrides).simulation
        assert (sim.clients_per_message, sim.vectorize) == (k, vectorize)
        # the vectorised variant's auto split is the actor's
        if name != "per-client":
            assert clients_per_message(load_config(None, overrides), 4) == per_worker
    assert list(VARIANTS) == list(expected)


def _run(round_s: float, mb: float, accuracies: list) -> dict:
    return {"startup_s": 2.0, "round_s": [round_s], "peak_mb": mb, "accuracies": accuracies}


def _words(line: str) -> str:
    return " ".join(line.split())


def test_the_scaling_table_and_plot_show_each_variant_against_the_plain_loop(tmp_path, capsys):
    from fedkd.bench import _plot_scaling, _print_scaling

    rows = []
    for per_round in (10, 100):
        fed = {
            name: {**_run(i + 1.0, 100.0 * (i + 1), []), "accuracies_same": verdict}
            for i, (name, verdict) in enumerate(
                [("per-client", "yes"), ("actor", "yes"), ("vectorised", "within 0.01 (...)")]
            )
        }
        rows.append({"per_round": per_round, "plain": _run(0.5, 50.0, []), "fedkd": fed})
    _print_scaling(rows, "title")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "title" and "s/round ratio" in lines[2]
    assert _words(lines[3]) == "10 plain PyTorch loop 2.00 0.50 50.00"
    assert _words(lines[4]) == "per-client tasks 2.00 1.00 100.00 2.00 yes"
    assert _words(lines[5]) == "one actor per worker 2.00 2.00 200.00 4.00 yes"
    assert _words(lines[6]) == "vectorised 2.00 3.00 300.00 6.00 within 0.01 (...)"
    assert lines[7].split()[0] == "100" and len(lines) == 12
    _plot_scaling(rows, list(VARIANTS), tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.simulation
def test_the_scaling_mode_writes_its_table_json_and_plot(tmp_path, capsys):
    import json

    args = ["--scaling", "--clients", "20", "--rounds", "2", "--out", str(tmp_path)]
    assert main([*args, "--variants", "actor", "data.public=400", "data.test=400"]) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["per_round"] for r in rows] == [10]  # 100 and 1000 exceed 20 clients
    (row,) = rows
    assert list(row["fedkd"]) == ["actor"]
    for run in (row["plain"], row["fedkd"]["actor"]):
        assert run["peak_mb"] > 0 and len(run["round_s"]) == 2
    actor = row["fedkd"]["actor"]
    assert actor["same"] is True
    # the start-up's two parts: before Ray, then Ray and its workers; together within it
    assert actor["before_engine_s"] > 0 and actor["engine_s"] > 0
    assert actor["before_engine_s"] + actor["engine_s"] <= actor["startup_s"]
    # the CPU it burnt before round 1: its own process and Ray's workers, which the
    # plain loop has none of
    assert actor["startup_cpu"]["process"] > 0.5 and actor["startup_cpu"]["workers"] > 0.5
    assert row["plain"]["startup_cpu"]["process"] > 0.5
    assert row["plain"]["startup_cpu"]["workers"] == row["plain"]["startup_cpu"]["ray"] == 0
    assert "simulation.vectorize=false" in row["fedkd"]["actor"]["overrides"]
    assert (tmp_path / "scaling.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "one actor per worker" in out and "same accuracies as the plain loop: yes" in out


@pytest.mark.slow
@pytest.mark.simulation
def test_the_sweep_mode_times_one_by_one_against_run_many_with_equal_accuracies(capsys):
    args = ["--sweep", "--strategies", "kd,fedmd", "--repeats", "1", *SMALL, "rounds=2"]
    assert main([*args, "privacy.audit=false", "server.public_subset=200"]) == 0
    out = capsys.readouterr().out
    assert "2 experiments (strategies kd, fedmd; 1 seed each" in out
    assert "same accuracies on both sides: yes" in out
    wall = next(line for line in out.splitlines() if line.startswith("wall time, s"))
    assert len(wall.split()) == 6  # label (3 words), both sides and their ratio


def _timed(round_s: list[float], cpu: dict[str, float]) -> dict:
    return {
        "startup_s": 3.0,
        "before_engine_s": 1.0,
        "engine_s": 1.5,
        "round_s": round_s,
        "peak_mb": 10.0,
        "accuracies": [[0.5]],
        "startup_cpu": cpu,
    }


def test_the_report_shows_the_start_ups_cpu_seconds_their_floor_and_each_pairs_ratio(
    monkeypatch, capsys
):
    import fedkd.bench as bench

    monkeypatch.setattr(bench, "cores", lambda: 2)
    fed = [
        _timed([1.0, 3.0], {"process": 4.0, "workers": 10.0, "ray": 3.0}),
        _timed([1.0], {"process": 5.0, "workers": 8.0, "ray": 2.0}),
    ]
    plain = [
        _timed([4.0], {"process": 2.0, "workers": 0.0, "ray": 0.0}),
        _timed([5.0], {"process": 3.0, "workers": 0.0, "ray": 0.0}),
    ]
    assert bench._report(fed, plain, audit=False) == 0
    lines = [_words(x) for x in capsys.readouterr().out.splitlines()]
    # medians over the two runs, by kind; the floor is the CPU-seconds over the 2 cores
    assert "CPU-seconds before round 1, all processes 16.00 2.50 6.40" in lines
    assert "the run's own process 4.50" in lines
    assert "Ray's worker processes 9.00" in lines
    assert "Ray's own services (GCS, raylet, ...) 2.50" in lines
    assert "start-up floor: those over the 2 cores 8.00" in lines  # (plain: one core)
    # the median round over all of a side's rounds (1.0 against 4.5), and each pair's
    assert "median seconds per round 1.00 4.50 0.22" in lines
    assert "ratio in each interleaved pair: 0.50, 0.20" in lines


@pytest.mark.slow
@pytest.mark.simulation
def test_the_benchmark_prints_its_figures_and_keeps_every_runs_in_a_file(tmp_path, capsys):
    import json

    args = ["--repeats", "1", "--out", str(tmp_path), *SMALL, "rounds=2"]
    assert main(args) == 0
    out = [_words(x) for x in capsys.readouterr().out.splitlines()]
    assert any(x.startswith("CPU-seconds before round 1, all processes") for x in out)
    assert "same per-round accuracies on both sides: yes" in out
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["cores"] >= 1 and f"strategy={MIRRORED}" in figures["overrides"]
    (fed,), (plain,) = figures["fedkd"], figures["plain"]
    assert len(fed["round_s"]) == len(plain["round_s"]) == 2
    assert fed["startup_cpu"]["workers"] > 0 and plain["startup_cpu"]["workers"] == 0
