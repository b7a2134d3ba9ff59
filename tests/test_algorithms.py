"""Every built-in algorithm in a short real Flower + Ray simulation (no mocks).

Each run: 4 clients (MLP and CNN students), 2 rounds, small MNIST-1D. Students must
end above chance (10 %), payloads must be of the algorithm's kind, and bytes must be
counted; misbehaving clients are mixed in where an algorithm should cope with them.
"""

from __future__ import annotations

import pytest

import fedkd
from fedkd.config import load_config
from tests.conftest import SMALL

pytestmark = pytest.mark.simulation

ALGORITHMS = ["local", "fedavg", "fedmd", "feddf", "dsfl", "fd", "cfd", "cronus"]


def _run(tmp_path, name: str, *extra: str):
    cfg = load_config(
        f"simulations/{name}.toml",
        [*SMALL, "rounds=2", "baseline=false", f"output_dir={tmp_path}", *extra],
    )
    return fedkd.run(cfg, quiet=True)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_runs_under_flower_and_students_beat_chance(name, tmp_path):
    extra = ["server.public_subset=200"] if name == "fedmd" else []
    result = _run(tmp_path, name, *extra)
    assert result.summary["status"] == "completed"
    assert [r["round"] for r in result.rounds] == [1, 2]
    last = result.rounds[-1]
    assert last["failures"] == []
    assert last["students"]["count"] == 4
    assert last["students"]["mean"] > 0.15, f"{name}: students at chance"
    comm = result.summary["communication"]
    if name == "local":
        assert comm["bytes_up"] == 0 and comm["bytes_down"] == 0
    else:
        assert last["bytes_up"] > 0 and last["bytes_down"] > 0
        assert all(c["bytes_up"] > 0 for c in last["clients"].values())
    if name in ("fedavg", "feddf"):  # weights both ways
        assert comm["share_of_fedavg"] == pytest.approx(1.0, rel=0.01)
    elif name != "local":
        assert comm["share_of_fedavg"] < 1.0, f"{name} should send less than FedAvg"
    if name in ("fedavg", "feddf", "dsfl", "cfd"):  # a server-side model is trained
        assert last["teacher"]["accuracy"] > 0.15


def test_fd_rejects_a_wrong_shaped_payload_and_goes_on(tmp_path):
    result = _run(tmp_path, "fd", 'clients.strategies={"3"="tests.faulty:WrongShapeClassLogits"}')
    for r in result.rounds:
        (failure,) = r["failures"]
        assert failure["client"] == 3 and "means have shape (10, 9)" in failure["error"]
        assert r["students"]["count"] == 3
    assert result.summary["status"] == "completed"


def test_a_payload_of_the_wrong_kind_is_rejected(tmp_path):
    result = _run(tmp_path, "dsfl", 'clients.strategies={"0"="tests.faulty:WrongKindClient"}')
    (failure,) = result.rounds[0]["failures"]
    assert failure["client"] == 0
    assert "accepts soft_labels, got logits" in failure["error"]


def test_cronus_filters_a_poisoning_client(tmp_path):
    result = _run(
        tmp_path, "cronus", 'clients.strategies={"2"="tests.faulty:AdversarialSoftLabels"}'
    )
    filtered = result.rounds[-1]["teacher"]
    assert filtered["filtered/2"] > 0.9, "the poisoning client is dropped on most samples"
    honest = [filtered[f"filtered/{c}"] for c in (0, 1, 3)]
    assert max(honest) < filtered["filtered/2"]
