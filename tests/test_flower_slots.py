"""Flower nodes are slots, not clients: a round's sampled clients are handed to as many
SuperNodes as a round samples, each message naming its client, with the same numbers
as the in-process runner (client state is keyed by client id, never by node)."""

from __future__ import annotations

import pytest

import fedkd
from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.flower import DataFile, FlowerJob, FlowerTransport, flower_nodes, make_client_app
from fedkd.inline import InlineTransport
from fedkd.results import read_rounds
from tests.conftest import SMALL
from tests.test_ray_cluster import InProcessGrid, _students


@pytest.mark.parametrize(
    ("overrides", "nodes"),
    [(["clients.count=4"], 4), (["clients.count=8", "clients.fraction=0.25"], 2),
     (["clients.count=10000", "clients.fraction=0.01", "data.private=50000"], 100)],
)  # fmt: skip
def test_as_many_nodes_as_a_round_samples(overrides, nodes):
    assert flower_nodes(load_config(None, overrides)) == nodes


@pytest.mark.parametrize("slots", [1, 2])
def test_fewer_nodes_than_clients_give_the_in_process_numbers(tmp_path, monkeypatch, slots):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # what run_simulation sets
        monkeypatch.setattr(TaskIdentity, name, 1)
    overrides = [*SMALL, "clients.count=6", "clients.fraction=0.5", "rounds=3"]
    cfg = load_config(None, [*overrides, f"output_dir={tmp_path}"])
    data, path = prepare_federated_data(cfg)
    job = FlowerJob(Federation(cfg, data), str(path), str(tmp_path / "clients"))
    grid = InProcessGrid(make_client_app([job], {str(path): DataFile(str(path))}))
    nodes = [100 + s for s in range(slots)]  # fewer than a round's 3 clients: round-robin
    flower = job.federation.run(FlowerTransport(grid, nodes, 60.0))
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert _students(flower) == _students(inline)
    assert [r.server_accuracy for r in flower] == [r.server_accuracy for r in inline]
    served = {m.metadata.dst_node_id for m in grid.sent}
    assert served == set(nodes)
    carried = [int(c) for m in grid.sent for c in m.content.config_records["client"]["cids"]]
    assert all(len(m.content.config_records["client"]["cids"]) == 1 for m in grid.sent)
    assert len(set(carried)) > 3


@pytest.mark.simulation
def test_a_flower_run_with_fewer_nodes_than_clients_equals_the_in_process_run(tmp_path):
    overrides = [*SMALL, "clients.count=8", "clients.fraction=0.25", "rounds=3"]
    overrides += ["baseline=false", "privacy.audit=false", f"output_dir={tmp_path}"]
    result = fedkd.run(None, overrides, quiet=True)
    assert result.summary.status == "completed"
    cfg = load_config(None, overrides)
    data, path = prepare_federated_data(cfg)
    inline = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    flower = read_rounds(result.directory / "metrics.jsonl")
    assert [sorted(r.clients) for r in flower] == [sorted(r.clients) for r in inline]
    assert _students(flower) == _students(inline)


@pytest.mark.parametrize(
    ("overrides", "workers", "per_message", "nodes"),
    [([], 2, 1, 4),  # default: one client a message
     (["simulation.clients_per_message=3"], 2, 3, 2),
     (["simulation.vectorize=true"], 2, 2, 2),  # auto: a round split over the workers
     (["simulation.vectorize=true"], 3, 2, 2),
     (["simulation.vectorize=true", "simulation.clients_per_message=1"], 2, 1, 4)],
)  # fmt: skip
def test_clients_per_message(overrides, workers, per_message, nodes):
    from fedkd.assignment import clients_per_message

    cfg = load_config(None, ["clients.count=4", *overrides])
    assert clients_per_message(cfg, workers) == per_message
    assert flower_nodes(cfg, workers) == nodes


def test_clients_per_message_must_not_be_negative():
    from fedkd.config import ConfigError

    with pytest.raises(ConfigError, match="simulation.clients_per_message"):
        load_config(None, ["simulation.clients_per_message=-1"])


@pytest.mark.parametrize("vectorize", [False, True])
def test_several_clients_a_message_give_the_in_process_numbers(tmp_path, monkeypatch, vectorize):
    """Three clients to a message, run in one task one after another (or, vectorised,
    trained together where they can), give the numbers of one client a message; a client
    that raises fails alone, the others of its message reply."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    overrides = [*SMALL, "clients.count=6", "rounds=3", "partition.name=iid"]
    overrides += ['clients.strategies={"4"="tests.faulty:ExplodingClient"}']
    grouped = [*overrides, "simulation.clients_per_message=3"]
    grouped.append(f"simulation.vectorize={str(vectorize).lower()}")
    cfg = load_config(None, [*grouped, f"output_dir={tmp_path}"])
    data, path = prepare_federated_data(cfg)
    job = FlowerJob(Federation(cfg, data), str(path), str(tmp_path / "clients"))
    grid = InProcessGrid(make_client_app([job], {str(path): DataFile(str(path))}))
    flower = job.federation.run(FlowerTransport(grid, [100, 101], 60.0, per_message=3))
    plain = load_config(None, overrides)
    inline = Federation(plain, data).run(InlineTransport(plain, str(path)))
    assert [sorted(r.clients) for r in flower] == [sorted(r.clients) for r in inline]
    assert 4 not in flower[1].clients and [f.cid for f in flower[1].failures] == [4]
    trained_together = {
        c for r in flower for c, x in r.clients.items() if x.metrics.get("train_vectorized")
    }
    assert trained_together == ({0, 2, 3, 5} if vectorize else set())  # 1, 4: no partner
    if vectorize:  # float tolerance: batched kernels sum in another order
        for a, b in zip(_students(flower), _students(inline), strict=True):
            assert a.keys() == b.keys()
            for c in a:
                assert a[c] == pytest.approx(b[c], abs=1e-3), c
    else:
        assert _students(flower) == _students(inline)
        assert [r.server_accuracy for r in flower] == [r.server_accuracy for r in inline]
    sizes = [len(m.content.config_records["client"]["cids"]) for m in grid.sent]
    assert sizes == [3, 3] * 3


def test_a_subclass_that_overrides_train_alone_does_not_train_in_groups():
    from strategies.kd import KDClient
    from strategies.local import LocalClient
    from tests.faulty import ExplodingClient

    assert KDClient.trains_in_groups() and LocalClient.trains_in_groups()
    assert not ExplodingClient.trains_in_groups()  # its train() would be skipped
