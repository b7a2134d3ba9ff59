"""Privacy mechanisms: clipping, noise, DP-SGD through Opacus, PATE, budget, audit.

Accounting against independent references lives in test_privacy_accounting.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedkd
from fedkd.client import ClientRuntime, load_state
from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, public_indices
from fedkd.inline import InlineTransport
from fedkd.payloads import ClassLogits, Logits, SoftLabels
from fedkd.privacy.accounting import accountant_epsilon, dpsgd_steps_per_round, gnmax_rdp
from fedkd.privacy.audit import attack_scores
from fedkd.privacy.noise import NoiseSource
from fedkd.privacy.release import central_mean, clip, local_release, values_of
from fedkd.runner import check_config
from tests.conftest import SMALL


def _cfg(tmp_path, *extra):
    return load_config(None, [*SMALL, f"output_dir={tmp_path}", "baseline=false", *extra])


def _payloads(seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(50)
    probs = rng.dirichlet(np.ones(10), size=50).astype(np.float32)
    return [
        Logits(idx, (5 * rng.normal(size=(50, 10))).astype(np.float32)),
        SoftLabels(idx, probs),
        ClassLogits(rng.normal(size=(10, 10)).astype(np.float32), np.arange(10.0)),
    ]


# --- clipping and noise ----------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.5, 1.0, 30.0])
def test_clipping_bound_holds(bound):
    for p in _payloads():
        clipped, norm = clip(p, bound)
        after = np.linalg.norm(values_of(clipped))
        assert after <= bound * (1 + 1e-6)
        if norm <= bound:  # already inside: untouched
            np.testing.assert_allclose(values_of(clipped), values_of(p), rtol=1e-6)
        else:  # scaled, direction kept
            np.testing.assert_allclose(values_of(clipped) * norm / bound, values_of(p), rtol=1e-5)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_configured_std(secure):
    noise = NoiseSource(seed=3, secure=secure)
    z = noise.normal((200_000,), 2.5, "test", 1, 2)
    assert abs(z.std() / 2.5 - 1) < 0.01  # 200k draws: std error of the std ~0.16 %
    assert abs(z.mean()) < 0.03
    again = noise.normal((200_000,), 2.5, "test", 1, 2)
    assert np.array_equal(z, again) != secure  # seeded: reproducible; secure: never


def test_seeded_noise_differs_by_round_and_client():
    noise = NoiseSource(seed=0)
    a, b, c = (noise.normal((100,), 1.0, "local", r, k) for r, k in [(1, 0), (2, 0), (1, 1)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_central_noise_std_is_sigma_c_over_n():
    sigma, bound, n = 1.5, 2.0, 8
    zeros = {cid: Logits(np.arange(2000), np.zeros((2000, 10), np.float32)) for cid in range(n)}
    noisy = central_mean(zeros, bound, sigma, NoiseSource(1), rnd=1)
    assert isinstance(noisy, Logits)
    assert abs(noisy.values.std() / (sigma * bound / n) - 1) < 0.02  # 20k entries


def test_central_mean_is_the_mean_of_clipped_payloads_plus_noise():
    payloads = {cid: p for cid, p in enumerate(_payloads(s)[0] for s in range(3))}
    tiny = central_mean(payloads, 1.0, 1e-9, NoiseSource(0), rnd=1)
    expected = np.mean([values_of(clip(p, 1.0)[0]) for p in payloads.values()], axis=0)
    np.testing.assert_allclose(tiny.values, expected, atol=1e-6)


def test_local_release_noise_and_valid_soft_labels():
    logits, soft, per_class = _payloads()
    out = local_release(logits, 1.0, 2.0, NoiseSource(0), rnd=1, cid=0)
    diff = out.values - clip(logits, 1.0)[0].values
    # replace-one adjacency: sensitivity 2C, so noise std 2 sigma C = 4
    assert abs(diff.std() / 4.0 - 1) < 0.05  # 500 entries
    probs = local_release(soft, 1.0, 0.5, NoiseSource(0), rnd=1, cid=0)
    probs.validate(num_classes=10, public_idx=soft.idx)  # projected back onto the simplex
    means = local_release(per_class, 1.0, 0.5, NoiseSource(0), rnd=1, cid=0)
    assert np.array_equal(means.counts, np.ones(10))  # the label histogram is not released


# --- audit ------------------------------------------------------------------------------


def test_attack_scores_by_hand():
    perfect = attack_scores(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]))
    assert perfect == {"mia_auc": 1.0, "mia_advantage": 1.0}
    blind = attack_scores(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert blind["mia_auc"] == 0.5 and blind["mia_advantage"] == 0.0
    # members 0.1, 0.5; non-members 0.3, 0.9: 3 of 4 pairs ordered -> AUC 0.75
    assert attack_scores(np.array([0.1, 0.5]), np.array([0.3, 0.9]))["mia_auc"] == 0.75


# --- config checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            ["strategy.name=fedavg", "clients.models=['mlp']", "privacy.mechanism=client_gaussian"],
            "privacy.mechanism",
        ),
        (["strategy.name=cronus", "privacy.mechanism=client_gaussian"], "privacy.mode"),
        (
            ["strategy.name=kd", "strategy.weighted=true", "privacy.mechanism=client_gaussian"],
            "privacy.mode",
        ),
        (["strategy.name=pate", "privacy.mechanism=dpsgd"], "privacy.mechanism"),
        (["strategy.name=pate", "privacy.target_epsilon=1"], "privacy.target_epsilon"),
        (["privacy.mechanism=dpsgd", "privacy.secure_noise=true"], "privacy.secure_noise"),
    ],
)
def test_incompatible_privacy_settings_fail_fast(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(tmp_path, *overrides))
    assert err.value.field == field


def test_impossible_budget_refuses_before_anything_runs(tmp_path):
    cfg = _cfg(tmp_path, "privacy.mechanism=dpsgd", "privacy.target_epsilon=0.5")
    with pytest.raises(ConfigError, match="cannot be met") as err:
        fedkd.run(cfg, quiet=True)
    assert err.value.field == "privacy.target_epsilon"
    assert not any(tmp_path.iterdir()), "no run directory for a refused run"


# --- DP-SGD -----------------------------------------------------------------------------


def test_dpsgd_client_keeps_its_accountant_across_rounds(tmp_path):
    cfg = _cfg(tmp_path, "privacy.mechanism=dpsgd", "strategy.name=local")
    data, path = prepare_federated_data(cfg)
    runtime = ClientRuntime(cfg, str(path))  # client state kept in memory between rounds
    idx = public_indices(cfg, 1)
    first = runtime.train(0, 1, None, idx[:0])
    state = runtime.store.load(0, 2)
    second = runtime.train(0, 2, None, idx[:0])
    n = len(data.parts[0])
    q, per_round = dpsgd_steps_per_round(n, cfg.clients.batch_size, cfg.clients.local_epochs)
    assert first.metrics["dp_steps"] == per_round and second.metrics["dp_steps"] == 2 * per_round
    assert second.metrics["epsilon"] > first.metrics["epsilon"] > 0
    expected = accountant_epsilon([(1.0, q, 2 * per_round)], 1e-5)
    assert second.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    saved = load_state(state)
    assert not any(k.startswith("_module") for k in saved["model"])  # plain module saved


def test_budget_stops_the_run_before_it_is_exceeded(tmp_path):
    cfg = _cfg(tmp_path, "rounds=6", "strategy.name=local", "privacy.mechanism=dpsgd")
    data, path = prepare_federated_data(cfg)
    full = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    eps = [r.privacy.epsilon for r in full]
    assert eps == sorted(eps)  # composition is monotone
    target = (eps[2] + eps[3]) / 2  # room for three rounds, not four
    capped = load_config(cfg, [f"privacy.target_epsilon={target}"])
    federation = Federation(capped, data)
    records = federation.run(InlineTransport(capped, str(path)))
    assert len(records) == 3 and records[-1].privacy.epsilon <= target
    assert "privacy budget" in federation.stopped and "round 4" in federation.stopped


# --- PATE -------------------------------------------------------------------------------


def test_pate_releases_noisy_majorities_and_accounts_for_them(tmp_path):
    from fedkd.payloads import Votes
    from strategies.pate import PATEParams, PATEServer

    cfg = _cfg(tmp_path, "strategy.name=pate", "clients.count=5")
    data, _ = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    server = federation.server
    server.round = 1
    strategy = PATEServer(PATEParams(sigma=1e-6, sigma1=1e-6, threshold=0.5))
    strategy.setup(server)
    idx = np.arange(4)
    votes = [[1, 2, 3, 3], [1, 2, 4, 3], [1, 5, 4, 3], [1, 6, 4, 0], [0, 7, 9, 0]]
    payloads = {c: Votes(idx, np.array(v, np.int16)) for c, v in enumerate(votes)}
    released = strategy.aggregate(server, payloads)
    # threshold 0.5 x 5 voters = 2.5. Query 0: 4 of 5 vote 1; query 2: 3 vote 4; query 3:
    # 3 vote 3 -> answered. Query 1: at most 2 votes for a class -> not answered
    np.testing.assert_array_equal(released.idx, [0, 2, 3])
    np.testing.assert_array_equal(released.probs.argmax(1), [1, 4, 3])
    expected = gnmax_rdp(3, 4, 1e-6, 1e-6)
    np.testing.assert_allclose(server.privacy.rdp, expected)


# --- real Flower + Ray runs -------------------------------------------------------------


@pytest.mark.simulation
def test_dpsgd_under_flower_trains_above_chance_at_a_stated_epsilon(tmp_path):
    cfg = _cfg(
        tmp_path,
        "strategy.name=local",
        "privacy.mechanism=dpsgd",
        "privacy.noise_multiplier=0.7",
        "rounds=3",
    )
    result = fedkd.run(cfg, quiet=True)
    last = result.rounds[-1]
    assert last.failures == () and last.students.mean > 0.15
    priv = result.summary.privacy
    assert priv.unit.startswith("record-level") and priv.delta == 1e-5
    client_eps = {c: m.metrics["epsilon"] for c, m in last.clients.items()}
    assert priv.clients == pytest.approx(client_eps, rel=1e-9)  # server mirrors clients
    assert 1 < priv.epsilon < 30
    assert 0 <= result.summary.audit.mia_advantage <= 1
    assert result.summary.status == "completed"


@pytest.mark.simulation
def test_central_client_level_noise_and_budget_stop_under_flower(tmp_path):
    cfg = _cfg(
        tmp_path,
        "strategy.name=dsfl",
        "privacy.mechanism=client_gaussian",
        "privacy.noise_multiplier=2.0",
        "rounds=4",
        "privacy.target_epsilon=3",
    )
    result = fedkd.run(cfg, quiet=True)
    assert result.summary.status.startswith("stopped early: privacy budget")
    assert result.exit_code == 4
    eps = [r.privacy.epsilon for r in result.rounds]
    assert 1 <= len(eps) < 4 and eps == sorted(eps) and eps[-1] <= 3
    assert result.summary.privacy.unit.startswith("client-level (central")


@pytest.mark.simulation
def test_privacy_sweep_writes_table_json_and_plot(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(root / "simulations" / "privacy_sweep.py"),
        "--out",
        str(tmp_path),
        "--sigmas-dpsgd",
        "1,4",
        "--sigmas-central",
        "",
        "--sigmas-pate",
        "",
        "--seeds",
        "2",
        *SMALL,
        "rounds=2",
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "privacy_utility.json").read_text())["rows"]
    assert [(r["mechanism"], r["sigma"]) for r in rows] == [
        ("none", None),
        ("dpsgd", 1.0),
        ("dpsgd", 4.0),
    ]
    assert rows[1]["epsilon"] > rows[2]["epsilon"] > 0  # more noise, less epsilon
    assert all(r["seeds"] == [0, 1] for r in rows)
    assert all(len(r["mia_advantage"]) == 2 for r in rows)  # mean, std over the seeds
    assert all(len(r["students"]) == 2 and 0 < r["students"][0] < 1 for r in rows)
    table = (tmp_path / "privacy_utility.md").read_text()
    assert "record-level" in table and "mean +- std over seeds [0, 1]" in table
    assert (tmp_path / "privacy_utility.png").stat().st_size > 10_000


def test_models_are_made_opacus_compatible():
    from opacus.validators import ModuleValidator

    from fedkd.privacy.dpsgd import make_compatible

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    assert ModuleValidator.validate(model, strict=False)  # BatchNorm mixes samples
    fixed = make_compatible(model)
    assert not ModuleValidator.validate(fixed, strict=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fixed.modules())
    plain = torch.nn.Linear(4, 2)
    assert make_compatible(plain) is plain  # nothing to fix: untouched


# --- fixes from the privacy review ------------------------------------------------------


def _dp_node(*extra):
    from tests.test_strategies import make_client

    cfg = load_config(None, ["privacy.mechanism=dpsgd", "clients.models=['logreg']", *extra])
    node = make_client(cfg, 0, n=64)
    node.privacy, node.seed = cfg.privacy, 0
    return node


def test_two_dpsgd_calls_in_one_round_draw_fresh_noise():
    """E.g. FedMD's warm-up and its revisit in a client's first round."""
    import copy

    node = _dp_node("privacy.noise_multiplier=50")  # noise dominates the update
    start = copy.deepcopy(node.model.state_dict())
    torch.manual_seed(0)  # same Poisson batches in both calls: only the noise may differ
    node.train_private(epochs=1)
    first = {k: v - start[k] for k, v in node.model.state_dict().items()}
    node.model.load_state_dict(start)  # same start, same data, one more call in the round
    node.reset_optimizer()
    torch.manual_seed(0)
    node.train_private(epochs=1)
    second = {k: v - start[k] for k, v in node.model.state_dict().items()}
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_client_refuses_dpsgd_steps_beyond_the_budget():
    from fedkd.privacy.accounting import PrivacyError

    node = _dp_node("privacy.noise_multiplier=1.0", "privacy.target_epsilon=10")
    node.train_private(epochs=1)  # fits
    spent = accountant_epsilon(node.state["dpsgd_history"], 1e-5)
    assert 0 < spent <= 10
    with pytest.raises(PrivacyError, match="would raise epsilon"):
        node.train_private(epochs=20)


def test_central_mean_divides_by_the_sampled_clients():
    idx = np.arange(3)
    ones = {c: Logits(idx, np.full((3, 2), 0.1, np.float32)) for c in range(2)}
    noisy = central_mean(ones, 10.0, 1e-9, NoiseSource(0), rnd=1, sampled=4)
    np.testing.assert_allclose(noisy.values, 0.05, atol=1e-6)  # 2 payloads, 2 zero vectors
    with pytest.raises(ValueError, match="sampled"):
        central_mean(ones, 10.0, 1.0, NoiseSource(0), rnd=1, sampled=1)
