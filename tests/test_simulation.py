"""Real Flower + Ray simulations (no mocks): distillation, faults, determinism, crashes."""

from __future__ import annotations

import pytest

import fedkd
from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.results import Outcome, read_rounds, read_summary
from fedkd.runner import RunError
from tests.conftest import SMALL

pytestmark = pytest.mark.simulation

FAULTS = {"1": "tests.faulty:ExplodingClient", "2": "tests.faulty:NaNClient"}
HEALTHY = [0, 3]  # clients 1 and 2 misbehave on purpose


def _round_accuracies(records):
    return [[r.clients[c].accuracy for c in sorted(r.clients)] for r in records]


def _students(record, cids):
    """Each client's student on the test set: (accuracy, loss), to compare bit for bit."""
    return {c: (record.clients[c].accuracy, record.clients[c].loss) for c in cids}


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """One real run on 2 Ray workers, with one exploding and one NaN-sending client."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [*SMALL, f"output_dir={out}", "simulation.ray_init_args={num_cpus=2}"])
    cfg = load_config(
        {**cfg.to_dict(), "clients": {**cfg.to_dict()["clients"], "strategies": FAULTS}}
    )
    return fedkd.run(cfg, quiet=True)


def test_distillation_happens_and_results_are_written(two_worker_run):
    result = two_worker_run
    # clients 1 and 2 fail on purpose: the run completes, and says who failed
    assert result.summary.outcome is Outcome.COMPLETED_WITH_FAILURES
    assert result.summary.status.startswith("completed with failures: ")
    assert result.exit_code == 3
    failed = {c for cids in result.summary.failures.rounds.values() for c in cids}
    assert failed == {1, 2}
    assert len(result.rounds) == 3
    first = [result.rounds[0].clients[c].accuracy for c in HEALTHY]
    last = [result.rounds[-1].clients[c].accuracy for c in HEALTHY]
    assert min(last) > 0.15, "students should be well above chance (10%)"
    assert sum(last) > sum(first), "students should improve over the rounds"
    assert result.rounds[-1].server_accuracy > 0.15
    assert result.rounds[1].bytes_down > result.rounds[0].bytes_down  # targets travel
    # Distillation, against the no-distillation control of the same run: the local-only
    # baseline trains the same students with the same seeds and never sees a target.
    # Round 1 has no targets yet (the teacher has learned nothing), so the students are
    # the baseline's bit for bit; from round 2 on the teacher's targets change every
    # healthy student. With strategy.kd_weight=0 they would stay equal in every round.
    baseline = result.baseline
    assert [r.round for r in baseline] == [1, 2, 3]
    assert _students(result.rounds[0], HEALTHY) == _students(baseline[0], HEALTHY)
    for fed, local in zip(result.rounds[1:], baseline[1:], strict=True):
        for c in HEALTHY:
            assert _students(fed, [c]) != _students(local, [c]), (
                f"round {fed.round}: client {c}'s student equals its local-only twin: "
                "the targets did not change it"
            )
    files = {p.name for p in result.directory.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "baseline.jsonl",
        "summary.json",
        "summary.txt",
        "accuracy.png",
    } <= files
    assert read_rounds(result.directory / "metrics.jsonl") == result.rounds
    assert read_rounds(result.directory / "baseline.jsonl") == baseline
    summary = read_summary(result.directory)
    assert summary == result.summary
    assert summary.final.local_only is not None
    roles = [a.role for a in summary.architectures]
    assert roles.count("teacher") == 1 and roles.count("student") == 2


def test_failing_and_malformed_clients_are_reported_not_fatal(two_worker_run):
    rounds = two_worker_run.rounds
    # Client 2 sends NaN logits every round: rejected with a reason, never aggregated.
    for r in rounds:
        reasons = {f.cid: f.error for f in r.failures}
        assert "non-finite" in reasons[2]
        assert 2 not in r.clients
        assert all(f.side == "client" for f in r.failures)
    # Client 1 raises in round 2 only; the round still completes with the others.
    r2 = {f.cid: f.error for f in rounds[1].failures}
    assert "exploded on purpose" in r2[1]
    assert rounds[1].students.count == 2
    assert 1 in rounds[2].clients  # and it is back in round 3
    assert two_worker_run.summary.failures.rounds == {1: (2,), 2: (1, 2), 3: (2,)}


def test_same_seed_same_numbers_whatever_the_worker_count(two_worker_run, tmp_path):
    cfg = load_config(
        two_worker_run.config,
        [f"output_dir={tmp_path}", "baseline=false", "simulation.ray_init_args={num_cpus=1}"],
    )
    one_worker = fedkd.run(cfg, quiet=True)
    assert _round_accuracies(one_worker.rounds) == _round_accuracies(two_worker_run.rounds)
    teacher = [r.server_accuracy for r in one_worker.rounds]
    assert teacher == [r.server_accuracy for r in two_worker_run.rounds]
    # The in-process runner computes exactly the same numbers as Flower + Ray.
    data, path = prepare_federated_data(cfg)
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert _round_accuracies(inline) == _round_accuracies(two_worker_run.rounds)


def test_server_crash_keeps_finished_rounds_on_disk(small_config, tmp_path):
    cfg = load_config(small_config, ["strategy.name=tests.faulty:CrashingServer"])
    with pytest.raises(RunError, match="server crashed on purpose") as raised:
        fedkd.run(cfg, quiet=True)
    result = raised.value.result
    assert result.summary.outcome is Outcome.FAILED and result.exit_code == 1
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert result.directory == run_dir
    assert len(read_rounds(run_dir / "metrics.jsonl")) == 1
    summary = read_summary(run_dir)
    assert summary.status.startswith("failed") and summary.rounds_completed == 1
