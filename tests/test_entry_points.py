"""Third-party plug-ins as installed packages: entry-point groups per registry.

A tiny package, ``some_kd_algo``, is written into ``tmp_path`` with an installed-
distribution record (``some_kd_algo-0.1.dist-info``) declaring its entry points, and
``tmp_path`` is put on ``sys.path``: ``importlib.metadata`` then finds it exactly as it
finds a ``pip install``-ed package in site-packages.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from fedkd.config import load_config
from fedkd.models import MODELS
from fedkd.registry import EntryPointError, Registry, UnknownNameError
from fedkd.strategy import CLIENT_STRATEGIES, SERVER_STRATEGIES
from tests.conftest import SMALL

PACKAGE = '''
"""A third-party KD algorithm: plain logit averaging, and a small MLP."""

import numpy as np
from torch import nn

from fedkd.strategy import ClientStrategy, Logits, ServerStrategy

IMPORTS = []  # how many times the module was imported (entry points load lazily)
IMPORTS.append(1)


class SomeClient(ClientStrategy):
    def train(self, node, targets):
        kd = targets if isinstance(targets, Logits) else None
        return node.train_private(kd=kd, kd_weight=0.5, temperature=2.0)

    def predict(self, node, public_idx):
        return Logits(public_idx, node.public_logits(public_idx))


class SomeServer(ServerStrategy):
    client_strategy = SomeClient
    uses_teacher = False
    accepts = (Logits,)

    def aggregate(self, server, payloads):
        return server.combine(payloads)


def build_some_mlp(input_shape, num_classes, hidden=16):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(np.prod(input_shape)), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


NOT_A_STRATEGY = 42
'''

ENTRY_POINTS = """
[fedkd.strategies]
some_kd = some_kd_algo:SomeServer
some_broken = some_kd_algo_missing:Server
some_int = some_kd_algo:NOT_A_STRATEGY

[fedkd.client_strategies]
some_kd = some_kd_algo:SomeClient

[fedkd.models]
some_mlp = some_kd_algo:build_some_mlp
"""


def _install(root: Path, name: str, entry_points: str, module: str | None = None) -> None:
    """Write package ``name`` (if ``module``) and its dist-info record under ``root``."""
    if module is not None:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(module)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``some_kd_algo`` installed on sys.path; registries are restored afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "some_kd_algo", ENTRY_POINTS, PACKAGE)
    registries = (SERVER_STRATEGIES, CLIENT_STRATEGIES, MODELS)
    for reg in registries:
        reg.names()  # built-ins registered before the snapshot
    saved = [dict(reg._by_name) for reg in registries]
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's caches
    importlib.invalidate_caches()
    yield site
    for reg, by_name in zip(registries, saved, strict=True):
        reg._by_name.clear()
        reg._by_name.update(by_name)
    sys.modules.pop("some_kd_algo", None)
    importlib.invalidate_caches()


def test_builtin_registries_have_their_groups():
    from fedkd.aggregators import AGGREGATORS
    from fedkd.data import DATASETS, PARTITIONERS
    from fedkd.kd import LOSSES
    from fedkd.losses import KD_LOSSES
    from fedkd.payloads import PAYLOADS
    from fedkd.privacy.mechanism import MECHANISMS
    from fedkd.recipes import OPTIMIZERS, SCHEDULES

    groups = {
        SERVER_STRATEGIES: "fedkd.strategies",
        CLIENT_STRATEGIES: "fedkd.client_strategies",
        MODELS: "fedkd.models",
        DATASETS: "fedkd.datasets",
        PARTITIONERS: "fedkd.partitioners",
        LOSSES: "fedkd.losses",
        KD_LOSSES: "fedkd.kd_losses",
        MECHANISMS: "fedkd.mechanisms",
        AGGREGATORS: "fedkd.aggregators",
        PAYLOADS: "fedkd.payloads",
        OPTIMIZERS: "fedkd.optimizers",
        SCHEDULES: "fedkd.schedules",
    }
    assert len(set(groups.values())) == len(groups)  # one group per registry
    for reg, group in groups.items():
        assert reg.group == group
    assert Registry("widget").group == "fedkd.widgets"
    assert Registry("privacy thing", group="").group == ""


def test_names_are_listed_without_importing_the_package(plugin):
    assert "some_kd" in SERVER_STRATEGIES.names()
    assert "some_kd" in SERVER_STRATEGIES and "some_kd" in list(SERVER_STRATEGIES)
    assert "some_mlp" in MODELS.names()
    assert "some_kd_algo" not in sys.modules
    assert SERVER_STRATEGIES.names() == sorted(SERVER_STRATEGIES.names())


def test_a_name_loads_checks_and_registers_its_entry_point(plugin):
    server = SERVER_STRATEGIES.get("some_kd")
    module = sys.modules["some_kd_algo"]
    assert server is module.SomeServer
    assert CLIENT_STRATEGIES.get("some_kd") is module.SomeClient
    assert MODELS.get("some_mlp") is module.build_some_mlp
    assert SERVER_STRATEGIES.get("some_kd") is server and module.IMPORTS == [1]
    assert SERVER_STRATEGIES.get("kd").__module__ == "strategies.kd"  # built-ins unchanged


def test_a_two_round_federation_with_the_installed_strategy_and_model(plugin, tmp_path):
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport
    from fedkd.runner import check_config

    cfg = load_config(
        None,
        [
            *SMALL,
            "rounds=2",
            "strategy.name=some_kd",
            "clients.models=['some_mlp', {name='some_mlp', hidden=8}]",
            "clients.local_epochs=1",
            "privacy.audit=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    check_config(cfg)  # every plug-in name and parameter resolves
    data, path = prepare_federated_data(cfg)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert [r.round for r in records] == [1, 2]
    for rec in records:
        assert not rec.failed and not rec.failures and len(rec.clients) == 4
        assert all(0 <= c.accuracy <= 1 for c in rec.clients.values())


def test_a_broken_entry_point_names_distribution_entry_point_and_group(plugin):
    with pytest.raises(EntryPointError) as err:
        SERVER_STRATEGIES.get("some_broken")
    text = str(err.value)
    assert "'some_broken'" in text and "'some_kd_algo'" in text
    assert "'fedkd.strategies'" in text and "some_kd_algo_missing" in text
    assert isinstance(err.value, UnknownNameError)  # reported as a config error

    with pytest.raises(EntryPointError, match="is not a valid strategy") as err:
        SERVER_STRATEGIES.get("some_int")
    assert "'some_kd_algo'" in str(err.value) and "'fedkd.strategies'" in str(err.value)
    assert "some_int" not in SERVER_STRATEGIES._by_name


def test_a_broken_entry_point_fails_the_config_check(plugin):
    from fedkd.runner import check_config

    with pytest.raises(UnknownNameError, match="some_kd_algo_missing"):  # fedkd run: exit 2
        check_config(load_config(None, ["strategy.name=some_broken"]))


def test_an_unknown_name_lists_the_installed_entry_points(plugin):
    with pytest.raises(UnknownNameError) as err:
        SERVER_STRATEGIES.get("no_such_kd")
    text = str(err.value)
    assert "unknown strategy 'no_such_kd'" in text
    assert "installed entry points of 'fedkd.strategies': some_broken, some_int, some_kd" in text
    assert "kd" in text.split("known: ", 1)[1]  # the built-ins too


def test_a_name_declared_by_two_distributions_is_refused(plugin):
    _install(plugin, "other_kd", "[fedkd.strategies]\nsome_kd = other_kd:Server\n")
    importlib.invalidate_caches()
    with pytest.raises(EntryPointError, match="several installed packages") as err:
        SERVER_STRATEGIES.get("some_kd")
    assert "'other_kd'" in str(err.value) and "'some_kd_algo'" in str(err.value)


def test_without_entry_points_listings_are_the_registered_names():
    reg = Registry("widget", group="fedkd.test_no_such_group")
    reg.register("b")(len)
    reg.register("a")(abs)
    assert reg.names() == ["a", "b"] and "c" not in reg
    with pytest.raises(UnknownNameError, match=r"known: a, b \(or an import path"):
        reg.get("c")


def test_fedkd_list_shows_installed_names(plugin, capsys):
    from fedkd.cli import main

    assert main(["list", "--input", "40", "--classes", "10"]) == 0
    lines = {ln[:18].strip(): ln[18:].strip() for ln in capsys.readouterr().out.splitlines()}
    assert "some_kd" in lines["strategies"].split(", ")
    assert "some_kd" in lines["client strategies"].split(", ")
    assert "some_mlp (826)" in lines["models"]  # 40*16+16 + 16*10+10 parameters
