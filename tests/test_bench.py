"""fedkd bench compares like with like: the plain loop does the work fedkd's runtime does
(the same accuracies, round by round), and the audit is on both sides or on neither."""

from __future__ import annotations

import time

import pytest

from fedkd.bench import MIRRORED, _both_sides, plain_loop
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


@pytest.mark.simulation
def test_the_scaling_mode_writes_its_table_json_and_plot(tmp_path, capsys):
    import json

    from fedkd.bench import main

    args = ["--scaling", "--clients", "20", "--rounds", "2", "--out", str(tmp_path)]
    assert main([*args, "data.public=400", "data.test=400"]) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["per_round"] for r in rows] == [10]  # 100 and 1000 exceed 20 clients
    for side in ("fedkd", "plain"):
        assert rows[0][side]["peak_mb"] > 0 and len(rows[0][side]["round_s"]) == 2
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "same accuracies: yes" in capsys.readouterr().out
