"""Config loading, dotted overrides, round-trips and field-naming errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedkd.config import (
    Config,
    ConfigError,
    Spec,
    apply_overrides,
    from_dict,
    load_config,
    parse_id_range,
    save_config,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "simulations" / "quickstart.toml"


# --- defaults and the quick-start file ---------------------------------------------


def test_quickstart_file_loads():
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart"
    assert cfg.partition == Spec("dirichlet", {"alpha": 0.5})
    assert cfg.server.teacher == Spec("cnn1d", {"channels": 64})
    assert cfg.clients.models == [Spec("mlp"), Spec("cnn1d")]


def test_defaults_match_quickstart_in_every_section_but_strategy_params():
    default, quick = load_config().to_dict(), load_config(QUICKSTART).to_dict()
    assert default.keys() == quick.keys()
    for key in default:
        if key == "strategy":
            assert default[key]["name"] == quick[key]["name"]
        else:
            assert default[key] == quick[key], key


def test_defaults_resolve_to_the_quickstart_strategy_params():
    from fedkd.selection import server_strategy

    assert server_strategy(load_config()).params == server_strategy(load_config(QUICKSTART)).params


def test_defaults_equal_quickstart():
    assert load_config() == load_config(QUICKSTART)


def test_load_config_accepts_a_config_and_a_mapping():
    cfg = load_config(None, ["rounds=4"])
    assert load_config(cfg) == cfg
    assert load_config({"rounds": 4}) == cfg
    assert load_config(cfg, ["rounds=5"]).rounds == 5


# --- dotted overrides ----------------------------------------------------------------


def test_override_top_level_int():
    cfg = load_config(None, ["rounds=3"])
    assert cfg.rounds == 3
    assert type(cfg.rounds) is int
    assert load_config().rounds == 10  # the defaults are untouched


def test_override_nested_field():
    cfg = load_config(QUICKSTART, ["clients.count=20"])
    assert cfg.clients.count == 20
    assert cfg.clients.models == [Spec("mlp"), Spec("cnn1d")]


def test_override_plugin_param_keeps_default_name():
    for source in (None, QUICKSTART):
        cfg = load_config(source, ["partition.alpha=0.1"])
        assert cfg.partition == Spec("dirichlet", {"alpha": 0.1})


def test_override_strategy_param():
    cfg = load_config(None, ["strategy.temperature=2.0"])
    assert cfg.strategy.name == "kd" and cfg.strategy.params["temperature"] == 2.0
    assert cfg.strategy.params["kd_weight"] == 0.5  # the other defaults stay
    cfg = load_config(QUICKSTART, ["strategy.temperature=2.0"])
    assert cfg.strategy.name == "kd"
    assert cfg.strategy.params["temperature"] == 2.0
    assert cfg.strategy.params["kd_weight"] == 0.5


def test_override_replaces_plugin_by_bare_name():
    cfg = load_config(None, ["partition=iid"])
    assert cfg.partition == Spec("iid")


def test_override_param_of_plugin_given_as_bare_string():
    # quickstart writes `dataset = "mnist1d"`: a param override turns it into a table
    cfg = load_config(QUICKSTART, ["data.dataset.iid_noise_scale=0.1"])
    assert cfg.data.dataset == Spec("mnist1d", {"iid_noise_scale": 0.1})


def test_override_values_are_parsed_as_toml():
    cfg = load_config(
        None,
        [
            "clients.models=['logreg', 'mlp']",
            "baseline=false",
            "clients.lr=1",  # an int where a float is expected is widened
            "name=my run",  # not TOML: kept as a string
            'clients.model_groups={"0-4" = "logreg"}',
        ],
    )
    assert cfg.clients.models == [Spec("logreg"), Spec("mlp")]
    assert cfg.baseline == []  # false: no baseline
    assert cfg.clients.lr == 1.0 and type(cfg.clients.lr) is float
    assert cfg.name == "my run"
    assert cfg.clients.model_groups == {"0-4": Spec("logreg")}


def test_apply_overrides_does_not_mutate_its_input():
    data = {"partition": {"name": "dirichlet", "alpha": 0.5}}
    out = apply_overrides(data, ["partition.alpha=0.1"])
    assert data["partition"]["alpha"] == 0.5
    assert out["partition"]["alpha"] == 0.1


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="field.path=value"):
        load_config(None, ["rounds"])


# --- round trips ---------------------------------------------------------------------


def _rich_config() -> Config:
    return load_config(
        QUICKSTART,
        [
            "seed=7",
            "partition.alpha=0.2",
            "simulation.num_gpus=0.5",
            'clients.model_groups={"0-2" = {name = "mlp", hidden = 32}, "9" = "logreg"}',
            'clients.strategies={"3-4" = "local"}',
            "server.public_subset=100",
        ],
    )


def test_to_dict_round_trip():
    for cfg in (load_config(), load_config(QUICKSTART), _rich_config()):
        assert load_config(cfg.to_dict()) == cfg


def test_to_dict_is_plain_data():
    def walk(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        else:
            assert isinstance(value, str | int | float | bool), value

    walk(_rich_config().to_dict())


def test_save_config_round_trip(tmp_path):
    cfg = _rich_config()
    path = tmp_path / "resolved.toml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_num_gpus_none_round_trips():
    cfg = load_config()
    assert cfg.simulation.num_gpus is None
    assert "num_gpus" not in cfg.to_dict()["simulation"]
    assert load_config(cfg.to_dict()).simulation.num_gpus is None


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]


# --- errors name the offending field -------------------------------------------------


def _error(overrides: list[str], source=None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides)
    return err.value


@pytest.mark.parametrize("rounds", ["-1", "0"])
def test_rounds_below_one(rounds):
    with pytest.raises(ConfigError, match="rounds: must be >= 1") as err:
        load_config(None, [f"rounds={rounds}"])
    assert err.value.field == "rounds"
    assert load_config(None, ["rounds=1"]).rounds == 1


def test_zero_clients():
    with pytest.raises(ConfigError, match="must be >= 1") as err:
        load_config(None, ["clients.count=0"])
    assert err.value.field == "clients.count"


def test_more_clients_than_private_samples():
    with pytest.raises(ConfigError, match="20 clients but only 10 private samples") as err:
        load_config(None, ["clients.count=20", "data.private=10"])
    assert err.value.field == "clients.count"
    assert load_config(None, ["clients.count=10", "data.private=10"]).clients.count == 10


def test_unknown_top_level_field_lists_valid_fields():
    with pytest.raises(ConfigError, match="unknown field") as err:
        load_config(None, ["roundz=3"])
    assert err.value.field == "roundz"
    for name in ("rounds", "seed", "clients", "strategy"):
        assert name in err.value.reason


def test_unknown_nested_field_lists_valid_fields():
    with pytest.raises(ConfigError, match=r"clients\.cuont: unknown field") as err:
        load_config(QUICKSTART, ["clients.cuont=3"])
    assert err.value.field == "clients.cuont"
    assert "count" in err.value.reason and "batch_size" in err.value.reason


def test_unknown_field_in_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nepochz = 2\n")
    with pytest.raises(ConfigError, match="epochz") as err:
        load_config(path)
    assert err.value.field == "server.epochz"


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ("rounds=ten", "rounds", "expected int"),
        ("rounds=2.5", "rounds", "expected int"),
        ("rounds=true", "rounds", "expected a number"),
        ("clients.lr=fast", "clients.lr", "expected float"),
        ("clients.lr=true", "clients.lr", "expected a number"),
        ("baseline=3", "baseline", "expected bool"),
        ("clients.models=mlp", "clients.models", "expected a list"),
        ("clients.models=[1]", "clients.models[0]", "name"),
        ("clients.model_groups=3", "clients.model_groups", "expected a table"),
        ("data=3", "data", "expected a table"),
        ("partition=3", "partition", "expected a name or a table"),
    ],
)
def test_wrong_type(override, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert err.value.field == field


def test_public_subset_larger_than_public_set():
    with pytest.raises(ConfigError, match="exceeds the public set") as err:
        load_config(None, ["data.public=100", "server.public_subset=101"])
    assert err.value.field == "server.public_subset"
    assert load_config(None, ["data.public=100", "server.public_subset=100"])


@pytest.mark.parametrize(
    ("key", "message"),
    [("8-12", "outside 0-9"), ("10", "outside 0-9"), ("-1", "look like"), ("a-b", "look like")],
)
def test_bad_client_range_in_model_groups(key, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [f'clients.model_groups={{"{key}" = "mlp"}}'])
    assert err.value.field.startswith("clients.model_groups")


@pytest.mark.parametrize("section", ["model_groups", "strategies"])
def test_bad_client_range_names_its_own_section(section):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f'clients.{section}={{"8-12" = "mlp"}}'])
    assert err.value.field in (f"clients.{section}", f"clients.{section}.8-12")


def test_more_field_errors():
    assert _error(["device=tpu"]).field == "device"
    assert _error(["clients.fraction=0"]).field == "clients.fraction"
    assert _error(["clients.fraction=1.5"]).field == "clients.fraction"
    assert _error(["clients.models=[]"]).field == "clients.models"
    assert _error(["server.lr=0"]).field == "server.lr"
    assert _error(["data.test=0"]).field == "data.test"
    assert _error(["data.public=-1"]).field == "data.public"
    assert _error(["simulation.backend=local"]).field == "simulation.backend"
    assert _error(["partition={alpha = 0.1, name = 3}"]).field == "partition"
    # zero is allowed where the docs say so
    assert load_config(None, ["data.public=0", "clients.local_epochs=0"]).data.public == 0


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as err:
        load_config(tmp_path / "missing.toml")
    assert err.value.field == "config"
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(bad)
    assert err.value.field == "config"


def test_config_error_under_prefixes_the_field():
    err = ConfigError("alpha", "must be > 0").under("partition")
    assert err.field == "partition.alpha"
    assert str(err) == "partition.alpha: must be > 0"
    assert ConfigError("", "oops").under("strategy").field == "strategy"
    assert isinstance(err, ValueError)


def test_from_dict_prefixes_post_init_errors():
    from fedkd.config import ClientsConfig

    with pytest.raises(ConfigError) as err:
        from_dict(ClientsConfig, {"batch_size": 0}, "clients")
    assert err.value.field == "clients.batch_size"


# --- helpers -------------------------------------------------------------------------


def test_parse_id_range():
    assert parse_id_range("3", 10, "p") == range(3, 4)
    assert parse_id_range("0-4", 10, "p") == range(0, 5)
    assert parse_id_range("0-9", 10, "p") == range(0, 10)
    with pytest.raises(ConfigError, match="outside"):
        parse_id_range("5-10", 10, "p")
    with pytest.raises(ConfigError, match="outside"):
        parse_id_range("5-2", 10, "p")


def test_spec_parse_and_str():
    assert Spec.parse("mlp") == Spec("mlp")
    spec = Spec.parse({"name": "cnn1d", "channels": 64})
    assert spec == Spec("cnn1d", {"channels": 64})
    assert spec.to_dict() == {"name": "cnn1d", "channels": 64}
    assert str(spec) == "cnn1d(channels=64)"
    assert str(Spec("mlp")) == "mlp"
    with pytest.raises(ConfigError, match="'name'") as err:
        Spec.parse({"channels": 64}, "server.teacher")
    assert err.value.field == "server.teacher"
