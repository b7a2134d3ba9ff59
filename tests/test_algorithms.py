"""Every built-in algorithm in a short real Flower + Ray simulation (no mocks).

Each run: 4 clients (MLP and CNN students), 2 rounds, small MNIST-1D. Students must
end above chance (10 %), payloads must be of the algorithm's kind, and bytes must be
counted; misbehaving clients are mixed in where an algorithm should cope with them.
Every federated algorithm must also change its students: each is compared with a
control run of the same config and seed with its knowledge transfer switched off
(:data:`TRANSFER_OFF`), run in-process (which computes the same numbers as Flower).
"""

from __future__ import annotations

import pytest

import fedkd
from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.results import Outcome
from tests.conftest import SMALL

# about 30 s each on 2 cores: CI runs them (`pytest -m slow`), the default command does not
pytestmark = [pytest.mark.simulation, pytest.mark.slow]

ALGORITHMS = ["local", "fedavg", "fedmd", "feddf", "dsfl", "fd", "cfd", "cronus", "dml", "fedproto"]

# What "no distillation" means for each algorithm: the overrides that switch its
# distillation step off (the clients' KD term or digest; for FedDF the server's ensemble
# distillation) and leave everything else as it is (the same students, data, seeds and
# schedule). FedAvg distils nothing: its control is local-only training, and its clients
# start round 1 from the server's model, not their own initialisation, so it is the one
# algorithm whose round 1 differs from its control.
TRANSFER_OFF = {
    "dml": ["strategy.kd_weight=0"],  # no mutual term
    "fedproto": ["strategy.ld=0"],  # no prototype term
    "fedavg": ["strategy.name=local"],
    "fedmd": ["strategy.digest_epochs=0"],  # no digest of the consensus
    "feddf": ["server.epochs=0"],  # prototypes are averaged but not distilled
    "dsfl": ["strategy.distill_epochs=0"],
    "fd": ["strategy.kd_weight=0"],
    "cfd": ["strategy.distill_epochs=0"],
    "cronus": ["strategy.kd_weight=0"],
}


def _run(tmp_path, name: str, *extra: str):
    cfg = load_config(
        f"simulations/{name}.toml",
        [*SMALL, "rounds=2", "baseline=false", f"output_dir={tmp_path}", *extra],
    )
    return fedkd.run(cfg, quiet=True)


def _control(config, overrides):
    """The same experiment in-process with ``overrides`` applied: its round records."""
    cfg = load_config(config, overrides)
    data, path = prepare_federated_data(cfg)
    return Federation(cfg, data).run(InlineTransport(cfg, str(path)))


def _students(record):
    """Each student on the test set: (accuracy, loss), compared bit for bit."""
    return {c: (r.accuracy, r.loss) for c, r in record.clients.items()}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_runs_under_flower_and_students_beat_chance(name, tmp_path):
    extra = ["server.public_subset=200"] if name == "fedmd" else []
    result = _run(tmp_path, name, *extra)
    assert result.summary.outcome is Outcome.COMPLETED
    assert result.summary.status == "completed"
    assert [r.round for r in result.rounds] == [1, 2]
    last = result.rounds[-1]
    assert last.failures == ()
    assert last.students.count == 4
    assert last.students.mean > 0.15, f"{name}: students at chance"
    comm = result.summary.communication
    if name == "local":
        assert comm.bytes_up == 0 and comm.bytes_down == 0
    else:
        assert last.bytes_up > 0 and last.bytes_down > 0
        assert all(c.bytes_up > 0 for c in last.clients.values())
    if name in ("fedavg", "feddf"):  # weights both ways
        assert comm.share_of_fedavg == pytest.approx(1.0, rel=0.01)
    elif name != "local":
        assert comm.share_of_fedavg < 1.0, f"{name} should send less than FedAvg"
    if name in ("fedavg", "feddf", "dsfl", "cfd"):  # a server-side model is trained
        assert last.server_accuracy > 0.15
    if name == "local":
        return
    # What the server sent changed every student: with the transfer switched off, the
    # same seeds give other students. Round 1 is the control's bit for bit (nothing to
    # distil yet), which shows the two runs differ only by the transfer.
    control = _control(result.config, TRANSFER_OFF[name])
    assert [r.round for r in control] == [1, 2]
    if name != "fedavg":
        assert _students(result.rounds[0]) == _students(control[0])
    ours, theirs = _students(last), _students(control[-1])
    assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3]
    same = [c for c in ours if ours[c] == theirs[c]]
    assert not same, f"{name}: clients {same} end exactly as without the transfer"


def test_fd_rejects_a_wrong_shaped_payload_and_goes_on(tmp_path):
    result = _run(tmp_path, "fd", 'clients.strategies={"3"="tests.faulty:WrongShapeClassLogits"}')
    for r in result.rounds:
        (failure,) = r.failures
        assert failure.cid == 3 and "means have shape (10, 9)" in failure.error
        assert r.students.count == 3
    # client 3 fails in every round, on purpose: the run says so
    assert result.summary.outcome is Outcome.COMPLETED_WITH_FAILURES
    assert result.summary.failures.rounds == {1: (3,), 2: (3,)}


def test_a_payload_of_the_wrong_kind_is_rejected(tmp_path):
    result = _run(tmp_path, "dsfl", 'clients.strategies={"0"="tests.faulty:WrongKindClient"}')
    (failure,) = result.rounds[0].failures
    assert failure.cid == 0
    assert "accepts soft_labels, got logits" in failure.error


def test_cronus_filters_a_poisoning_client(tmp_path):
    result = _run(
        tmp_path, "cronus", 'clients.strategies={"2"="tests.faulty:AdversarialSoftLabels"}'
    )
    filtered = result.rounds[-1].server
    assert filtered["filtered/2"] > 0.9, "the poisoning client is dropped on most samples"
    honest = [filtered[f"filtered/{c}"] for c in (0, 1, 3)]
    assert max(honest) < filtered["filtered/2"]
