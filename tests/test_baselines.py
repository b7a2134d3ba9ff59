"""Attribution baselines: transfer-only is FedMD without collaboration, centralised
pools the private data per architecture, and both are checked before anything runs."""

from __future__ import annotations

import pytest

from fedkd.baselines import baseline_config, run_centralised
from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.results.records import RunSummary
from fedkd.results.summary import final_accuracies
from fedkd.runner import check_config
from tests.conftest import SMALL

BASE = [*SMALL, "rounds=2", "privacy.audit=false"]


def _run(cfg):
    data, path = prepare_federated_data(cfg)
    return Federation(cfg, data).run(InlineTransport(cfg, str(path)))


def test_baseline_takes_true_false_or_a_list_in_a_fixed_order():
    assert load_config(None, []).baseline == ["local"]
    assert load_config(None, ["baseline=false"]).baseline == []
    both = load_config(None, ['baseline=["centralised","local","transfer"]'])
    assert both.baseline == ["local", "transfer", "centralised"]
    for bad in ('baseline=["oracle"]', 'baseline=["local","local"]'):
        with pytest.raises(ConfigError) as err:
            load_config(None, [bad])
        assert err.value.field == "baseline"


def test_baselines_that_cannot_run_are_refused_before_anything_runs():
    proxy = 'data.public={dataset="cifar100", size=10}'
    with pytest.raises(ConfigError) as err:  # (no files needed: the baseline check is first)
        from fedkd.run_steps import _check_baselines

        _check_baselines(load_config(None, [proxy, 'baseline=["transfer"]']))
    assert err.value.field == "baseline" and "labelled" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, [*BASE, 'baseline=["fedavg"]']))  # mlp + cnn1d
    assert err.value.field == "baseline" and "same architecture" in str(err.value)
    check_config(load_config(None, [*BASE, 'clients.models=["mlp"]', 'baseline=["fedavg"]']))


def test_transfer_only_is_fedmd_without_its_collaboration():
    """FedMD with nothing digested trains exactly as the transfer-only control does."""
    fedmd = load_config(None, [*BASE, 'strategy={name="fedmd", digest_epochs=0}'])
    transfer = baseline_config(fedmd, "transfer")
    assert transfer.strategy.name == "transfer" and transfer.baseline == []
    a, b = _run(fedmd), _run(transfer)
    assert final_accuracies(a) == final_accuracies(b)
    assert all(r.bytes_up == 0 for r in b)  # nothing sent


def test_fedmds_own_transfer_epochs_carry_over():
    cfg = load_config(None, [*BASE, 'strategy={name="fedmd", transfer_epochs=5}'])
    assert baseline_config(cfg, "transfer").strategy.params == {"transfer_epochs": 5}


def test_centralised_trains_one_model_per_architecture_on_the_pooled_data():
    cfg = load_config(None, BASE)
    data, _ = prepare_federated_data(cfg)
    records = run_centralised(cfg, data)
    assert [r.round for r in records] == [1, 2]
    last = records[-1].clients
    pooled = sum(len(p) for p in data.parts)
    assert all(c.num_examples == pooled for c in last.values())
    by_model: dict[str, set[float]] = {}
    for c in last.values():
        by_model.setdefault(c.model, set()).add(c.accuracy)
    assert len(by_model) == 2 and all(len(v) == 1 for v in by_model.values())
    again = run_centralised(cfg, data)
    assert final_accuracies(again) == final_accuracies(records)  # seeded
    local = final_accuracies(_run(baseline_config(cfg, "local")))
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(final_accuracies(records)) > mean(local)  # 4x the data per model


def test_summary_keeps_the_baselines_and_reads_them_back():
    from fedkd.results.summary import outcome_of, summarize
    from fedkd.run_steps import _profiles

    cfg = load_config(None, BASE)
    data, _ = prepare_federated_data(cfg)
    records = run_centralised(cfg, data)
    summary = summarize(
        cfg, records, [], _profiles(cfg, data, uses_teacher=False), {"rounds_s": 1.0},
        outcome_of(cfg, records, [], None, False, None),
        test_size=len(data.test_y), uses_teacher=False, baselines={"centralised": records},
    )  # fmt: skip
    assert summary.final.baselines["centralised"].count == cfg.clients.count
    back = RunSummary.from_json(summary.to_json())
    assert back.final.baselines == summary.final.baselines


def test_feddf_leaves_an_architecture_without_clients_this_round_alone():
    """Algorithm 1 fuses the received models: a prototype no client trained this round
    is not distilled (it keeps its model)."""
    cfg = load_config(
        None,
        [*BASE, "rounds=4", "strategy=feddf", "clients.fraction=0.25", "baseline=false"],
    )  # one client of four per round: one architecture of two takes part
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    records = federation.run(InlineTransport(cfg, str(path)))
    server = federation.server
    seen: set[str] = set()
    for r in records:
        present = {str(server.student_spec(c)) for c in r.sampled}
        seen |= present
        distilled = {k.split("/", 1)[1] for k in (r.server or {}) if k.startswith("kd/")}
        assert distilled == present, r.round
    assert len(seen) == 2  # both architectures took part in some round, not every round
