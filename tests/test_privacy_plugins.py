"""Privacy mechanisms as plug-ins: a user's own mechanism by import path, and no
mechanism name compared outside ``fedkd/privacy``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedkd.config import ConfigError, load_config
from fedkd.payloads import Payload
from fedkd.privacy import MECHANISMS, Mechanism, NoiseSource, mechanism_of
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.privacy.release import values_of, with_values
from fedkd.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_privacy_plugins"


@dataclass(frozen=True)
class LaplaceParams:
    epsilon: float = 1.0  # pure epsilon of one release
    bound: float = 5.0  # L1 norm each payload is clipped to

    def __post_init__(self) -> None:
        for name in ("epsilon", "bound"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)!r}")


class LaplaceUpload(Mechanism):
    """Local pure DP: clip each payload to L1 norm B, add Laplace(2B / epsilon) noise
    before upload; ``epsilon`` per release, composed additively."""

    Params = LaplaceParams
    acts_on = "upload"
    unit = "client-level (local Laplace on shared payloads)"
    accountant: ClassVar[str | None] = "pure (basic composition)"

    def __init__(self, privacy: Any) -> None:
        super().__init__(privacy)
        self.releases: dict[int, int] = {}

    def release(self, payload: Payload, *, noise: NoiseSource, rnd: int, cid: int) -> Payload:
        v = values_of(payload)
        norm = float(np.abs(v).sum())
        v = v * min(1.0, self.params.bound / norm) if norm > 0 else v
        rng = np.random.default_rng(derive_seed(noise.seed, "laplace", rnd, cid))
        return with_values(
            payload, v + rng.laplace(0.0, 2 * self.params.bound / self.params.epsilon, v.shape)
        )

    def charge(self, ledger: PrivacyLedger, cids: list[int], metrics: dict) -> None:
        for cid in metrics:  # every client that replied released its noisy payload
            self.releases[cid] = self.releases.get(cid, 0) + 1

    def epsilon(self, ledger: PrivacyLedger, cid: int, extra_round: bool) -> float:
        return self.params.epsilon * (self.releases.get(cid, 0) + int(extra_round))


REF = f"{HERE}:LaplaceUpload"


def test_a_user_mechanism_loads_by_import_path_with_its_own_validated_table():
    cfg = load_config(None, [f"privacy.mechanism={REF}", "privacy.params.epsilon=0.5"])
    mechanism = mechanism_of(cfg)
    assert isinstance(mechanism, LaplaceUpload) and mechanism.params == LaplaceParams(0.5)
    assert mechanism.acts_on == "upload" and not mechanism.seals
    assert MECHANISMS.get(REF) is LaplaceUpload
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"privacy.mechanism={REF}", "privacy.params.epsilon=-1"])
    assert err.value.field == "privacy.params.epsilon"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"privacy.mechanism={REF}", "privacy.params.epsilom=1"])
    assert err.value.field == "privacy.params.epsilom"
    with pytest.raises(ConfigError) as err:  # the built-ins' tables are checked too
        load_config(None, ["privacy.mechanism=dpsgd", "privacy.params.sigma=1"])
    assert err.value.field == "privacy.params.sigma"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"privacy.mechanism={HERE}:LaplaceParams"])  # not a Mechanism
    assert err.value.field == "privacy.mechanism"


def test_builtins_declare_where_they_act():
    def acts(*overrides: str) -> str:
        return mechanism_of(load_config(None, list(overrides))).acts_on

    assert acts() == "none" and not mechanism_of(load_config(None, [])).active
    assert acts("privacy.mechanism=dpsgd") == "training"
    assert acts("privacy.mechanism=client_gaussian") == "aggregate"
    assert acts("privacy.mechanism=client_gaussian", "privacy.mode=local") == "upload"


def test_builtins_take_their_own_table_or_the_flat_short_form():
    def params(*overrides: str) -> Any:
        return mechanism_of(load_config(None, list(overrides))).params

    gaussian = "privacy.mechanism=client_gaussian"
    assert params(gaussian).clip == 1.0 and params(gaussian).mode == "central"
    assert params(gaussian, "privacy.clip=2.5").clip == 2.5  # the short form
    table = params(gaussian, "privacy.params.clip=2.5", 'privacy.params.mode="local"')
    assert (table.clip, table.mode) == (2.5, "local")
    local = mechanism_of(load_config(None, [gaussian, 'privacy.params.mode="local"']))
    assert local.acts_on == "upload"  # the table decides where it acts
    dpsgd = params("privacy.mechanism=dpsgd", "privacy.params.max_grad_norm=0.5")
    assert (dpsgd.max_grad_norm, dpsgd.noise_multiplier) == (0.5, 1.0)
    with pytest.raises(ConfigError) as err:  # both ways at once: which one wins?
        load_config(None, [gaussian, "privacy.clip=2", "privacy.params.clip=3"])
    assert err.value.field == "privacy.params.clip"
    with pytest.raises(ConfigError) as err:
        load_config(None, [gaussian, 'privacy.params.mode="sideways"'])
    assert err.value.field.startswith("privacy.params") and "sideways" in str(err.value)
    with pytest.raises(ConfigError) as err:  # "none" takes no parameters
        load_config(None, ["privacy.params.clip=1"])
    assert err.value.field == "privacy.params.clip"


class _Recording:
    """An in-process transport that keeps every uploaded payload."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.payloads = inner, {}

    def train(self, rnd: int, requests: dict, public_idx: np.ndarray) -> dict:
        replies = self.inner.train(rnd, requests, public_idx)
        for cid, reply in replies.items():
            self.payloads[rnd, cid] = values_of(reply.payload)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _federate(small_config: Any, *extra: str) -> tuple[list, dict]:
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport
    from fedkd.runner import check_config

    cfg = load_config(small_config, ["rounds=2", "privacy.audit=false", *extra])
    check_config(cfg)
    data, path = prepare_federated_data(cfg)
    transport = _Recording(InlineTransport(cfg, str(path)))
    return Federation(cfg, data).run(transport), transport.payloads


def test_a_user_mechanism_runs_a_federation_and_reports_its_epsilon(small_config):
    """Laplace noise on every upload, seeded, and pure-epsilon accounting composed over
    rounds: no edit to fedkd, only ``privacy.mechanism = "<module>:<Class>"``."""
    plain, clear = _federate(small_config)
    records, noisy = _federate(
        small_config, f"privacy.mechanism={REF}", "privacy.params.epsilon=0.25"
    )
    again, noisy_again = _federate(
        small_config, f"privacy.mechanism={REF}", "privacy.params.epsilon=0.25"
    )
    assert plain[-1].privacy is None
    assert clear.keys() == noisy.keys() and clear
    for key in clear:
        assert not np.allclose(clear[key], noisy[key])  # the noise was applied
        assert np.abs(noisy[key]).sum() > 0
        np.testing.assert_array_equal(noisy[key], noisy_again[key])  # and is seeded
    for rnd, record in enumerate(records, start=1):
        privacy = record.privacy
        assert privacy.mechanism == REF and privacy.unit == LaplaceUpload.unit
        assert privacy.accountant == "pure (basic composition)"
        assert privacy.epsilon == pytest.approx(0.25 * rnd)  # composed additively
        assert all(e == pytest.approx(0.25 * rnd) for e in privacy.clients.values())
    assert again[-1].privacy == records[-1].privacy  # what the run summary reports


def test_the_budget_stops_a_user_mechanism(small_config):
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(
        small_config,
        [
            "rounds=3",
            "privacy.audit=false",
            f"privacy.mechanism={REF}",
            "privacy.params.epsilon=0.5",
            "privacy.target_epsilon=1.2",
        ],
    )
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data)
    records = federation.run(InlineTransport(cfg, str(path)))
    assert len(records) == 2 and records[-1].privacy.epsilon == pytest.approx(1.0)
    assert "privacy budget" in (federation.stopped or "")


#: a built-in mechanism's name compared with something, or a mechanism compared by name
COMPARISON = re.compile(
    r"""(==|!=|\bin\b|\bnot in\b)\s*\(?\s*["'](none|client_gaussian|dpsgd|pate)["']"""
    r"""|["'](none|client_gaussian|dpsgd|pate)["']\s*(==|!=)"""
    r"""|\bmechanism\s*(==|!=)|\.mechanism\s+(not\s+)?in\b"""
)


def test_no_mechanism_name_is_compared_outside_fedkd_privacy():
    privacy = ROOT / "fedkd" / "privacy"
    found = []
    for folder in (ROOT / "fedkd", ROOT / "strategies"):
        for path in sorted(folder.rglob("*.py")):
            if privacy in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if COMPARISON.search(code) and "mechanism" in code:
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    assert COMPARISON.search('if cfg.privacy.mechanism == "dpsgd":')  # the check bites
    assert COMPARISON.search('p.mechanism != "none"')
    assert COMPARISON.search("privacy.mechanism in TRAINING_TIME")
