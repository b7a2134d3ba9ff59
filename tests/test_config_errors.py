"""Bad settings fail with a ConfigError naming the field, the value and what would work.

Every error here is raised before Flower or Ray could start: by ``load_config``, by
``check_data_config`` (before any data is generated) or, for what only the data can
tell, by ``build_federated_data``. No test starts a simulation.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import pytest

from fedkd.config import ClientsConfig, Config, ConfigError, from_dict, load_config
from fedkd.data import PARTITIONERS, FederatedData, Pool, prepare_federated_data
from fedkd.data.prepare import build_federated_data, check_data_config
from fedkd.seeding import derive_seed

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)

HERE = "tests.test_config_errors"
# Small and fast: a synthetic pool of 300 samples.
SMALL = ("data.dataset=synthetic", "data.private=100", "data.public=100", "data.test=100")


def config_error(*overrides: str, build: bool = False, source: object = None) -> ConfigError:
    """The ConfigError that loading (and checking, or building) the config raises."""
    with pytest.raises(ConfigError) as err:
        cfg = load_config(source, list(overrides))
        check_data_config(cfg)
        if build:
            build_federated_data(cfg)
    return err.value


@functools.cache
def quickstart() -> FederatedData:
    return build_federated_data(load_config(None))


# --- the quick-start's data is unchanged ---------------------------------------------


def test_quickstart_partition_is_unchanged():
    data = quickstart()
    assert [len(p) for p in data.parts] == [332, 261, 174, 185, 194, 620, 279, 192, 270, 493]
    digest = hashlib.sha256(b"".join(p.tobytes() for p in data.parts)).hexdigest()[:16]
    assert digest == "7b4a333de6ff28d1"  # the rows of every client, as before these checks


# --- 1. rounds -----------------------------------------------------------------------


@pytest.mark.parametrize("rounds", ["0", "-3"])
def test_rounds_must_be_at_least_one(rounds):
    err = config_error(f"rounds={rounds}")
    assert err.field == "rounds"
    assert "must be >= 1" in err.reason and f"got {rounds}" in err.reason


# --- 2. partitions that cannot work --------------------------------------------------


def test_dirichlet_without_a_fitting_draw_names_min_size_and_what_works():
    err = config_error("clients.count=100", build=True)
    assert err.field == "partition.min_size"
    for words in ("alpha=0.5", "100 clients", "3000 private samples", "min_size=10", "30 each"):
        assert words in err.reason, words
    assert "data.private" in err.reason
    assert "max number of attempts" not in err.reason  # flwr-datasets' own words
    fixes = dict(re.findall(r"(partition\.\w+|clients\.count)=([\w.]+)", err.reason))
    assert set(fixes) >= {"partition.min_size", "partition.alpha", "clients.count"}
    # each suggested setting really works for this seed
    labels, seed = quickstart().private_y, derive_seed(0, "partition")
    for key, value in fixes.items():
        count, kwargs = 100, {"alpha": 0.5, "min_size": 10, "self_balancing": False}
        if key == "clients.count":
            count = int(value)
        elif key == "partition.alpha":
            kwargs["alpha"] = float(value)
        elif key == "partition.min_size":
            kwargs["min_size"] = int(value)
        else:
            kwargs["self_balancing"] = value == "true"
        parts = PARTITIONERS.get("dirichlet")(labels, count, seed, **kwargs)
        assert min(len(p) for p in parts) >= kwargs["min_size"], key


@pytest.mark.parametrize("count", ["1000", "301"])
def test_dirichlet_min_size_times_clients_exceeds_private_set(count):
    err = config_error(f"clients.count={count}")  # before any data is generated
    assert err.field == "partition.min_size"
    for words in (f"{count} clients", "min_size=10", "3000 private samples"):
        assert words in err.reason, words
    assert "partition.min_size <=" in err.reason and "clients.count <= 300" in err.reason


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("partition.min_size=-1", "partition.min_size", "must be >= 0"),
        ("partition.alpha=nan", "partition.alpha", "finite"),
        ("partition.alpha=inf", "partition.alpha", "finite"),
        ("partition.alpha=0", "partition.alpha", "must be > 0"),
        ("partition.alpha=abc", "partition.alpha", "expected float"),
        ("partition.min_size=2.5", "partition.min_size", "expected int"),
        ("partition.self_balancing=1", "partition.self_balancing", "expected bool"),
        ("partition.seed=3", "partition.seed", "set the run's seed"),
    ],
)
def test_dirichlet_bad_parameters(override, field, words):
    err = config_error(override)
    assert err.field == field
    assert words in err.reason


def test_pathological_class_split_among_too_many_clients():
    err = config_error(*SMALL, "partition=pathological", "clients.count=60", build=True)
    assert err.field == "clients.count"
    for words in ("60 clients", "rarest class", "of the 100 private samples", "or fewer"):
        assert words in err.reason, words
    assert "partition.classes_per_client" in err.reason


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("partition.assignment=sorted", "partition.assignment", "must be one of"),
        ("partition.classes_per_client=0", "partition.classes_per_client", "must be >= 1"),
    ],
)
def test_pathological_bad_parameters(override, field, words):
    err = config_error("partition=pathological", override)
    assert err.field == field
    assert words in err.reason


def test_pathological_more_classes_than_the_data_has():
    err = config_error(
        *SMALL, "partition=pathological", "partition.classes_per_client=11", build=True
    )
    assert err.field == "partition.classes_per_client"
    assert "must be in 1..10" in err.reason and "got 11" in err.reason


@pytest.mark.parametrize("shards", ["4", "0"])
def test_shard_does_not_fit(shards):
    err = config_error(
        "partition=shard", "clients.count=1000", f"partition.shards_per_client={shards}"
    )
    assert err.field == "partition.shards_per_client"
    assert "1000 clients" in err.reason and "<= 3" in err.reason


def test_shard_count_must_be_whole():
    err = config_error("partition=shard", "partition.shards_per_client=2.0")
    assert err.field == "partition.shards_per_client"
    assert "expected int" in err.reason


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological", "shard"])
def test_more_clients_than_samples_when_called_directly(name):
    with pytest.raises(ConfigError) as err:
        PARTITIONERS.get(name)(np.arange(5) % 2, 6, 0)
    assert err.value.field == "clients.count"
    assert "6 clients for 5 private samples" in err.value.reason


def test_every_partitioner_checks_its_settings_before_data_exists():
    for name in ("iid", "dirichlet", "pathological", "shard"):
        assert callable(PARTITIONERS.get(name).precheck), name


# A user partitioner with a min_size parameter, and others that break the contract.


def uneven(labels: np.ndarray, num_clients: int, seed: int, min_size: int = 5) -> list:
    """Client 0 gets 2 rows, the others share the rest."""
    rest = np.array_split(np.arange(2, len(labels)), num_clients - 1)
    return [np.arange(2), *rest]


def one_empty(labels: np.ndarray, num_clients: int, seed: int) -> list:
    return [np.arange(0), *np.array_split(np.arange(len(labels)), num_clients - 1)]


def overlapping(labels: np.ndarray, num_clients: int, seed: int) -> list:
    return [np.arange(len(labels))] * num_clients


def test_client_below_min_size_is_reported():
    err = config_error(*SMALL, f"partition={HERE}:uneven", build=True)
    assert err.field == "partition.min_size"
    assert "fewer than partition.min_size=5" in err.reason and "client 0 has 2" in err.reason
    err = config_error(*SMALL, f"partition={{name = '{HERE}:uneven', min_size = 3}}", build=True)
    assert "min_size=3" in err.reason
    data = build_federated_data(
        load_config(None, [*SMALL, f"partition={{name = '{HERE}:uneven', min_size = 2}}"])
    )
    assert len(data.parts[0]) == 2


def test_dirichlet_min_size_zero_still_needs_every_client_served():
    err = config_error(
        *SMALL, "clients.count=50", "partition.alpha=0.05", "partition.min_size=0", build=True
    )
    assert err.field == "partition"
    assert "no private samples" in err.reason and "partition.min_size >= 1" in err.reason


def test_broken_user_partitions_are_config_errors():
    err = config_error(*SMALL, f"partition={HERE}:one_empty", build=True)
    assert err.field == "partition" and "no private samples" in err.reason
    err = config_error(*SMALL, f"partition={HERE}:overlapping", build=True)
    assert err.field == "partition" and "two clients" in err.reason


# --- 3. datasets too small for the split sizes ---------------------------------------


def test_digits_too_small_before_anything_is_built():
    err = config_error("data.dataset=digits")
    assert err.field == "data"
    assert "5000" in err.reason and "has 1797 samples" in err.reason
    assert "data.private=1197 data.public=300 data.test=300" in err.reason


def test_readme_digits_command_builds():
    overrides = [
        "data.dataset=digits",
        "data.private=1197",
        "data.public=300",
        "data.test=300",
        'clients.models=["mlp","logreg"]',
        "server.teacher=mlp",
    ]
    data, _ = prepare_federated_data(load_config(None, overrides))
    assert sum(len(p) for p in data.parts) == 1197
    assert (len(data.public_y), len(data.test_y)) == (300, 300)


@pytest.mark.parametrize(
    ("sizes", "suggestion"),
    [
        ((1700, 100, 100), "data.private=1597 data.public=100 data.test=100"),
        ((1000, 500, 1000), "data.private=797 data.public=300 data.test=700"),
    ],
)
def test_suggested_sizes_fit(sizes, suggestion):
    private, public, test = sizes
    err = config_error(
        "data.dataset=digits",
        f"data.private={private}",
        f"data.public={public}",
        f"data.test={test}",
    )
    assert err.field == "data" and suggestion in err.reason


def tiny(num_samples: int, seed: int, classes: int = 2) -> Pool:
    """A user dataset that can provide ``50 * classes`` samples."""
    y = np.arange(50 * classes) % classes
    return Pool(np.eye(classes, dtype=np.float32)[y], y.astype(np.int64), classes)


tiny.max_samples = lambda classes=2: 50 * classes  # type: ignore[attr-defined]


def test_max_samples_may_depend_on_the_dataset_parameters():
    err = config_error(f"data.dataset={{name = '{HERE}:tiny', classes = 3}}", "clients.count=2")
    assert err.field == "data" and "has 150 samples" in err.reason
    assert "data.private=" in err.reason


# --- 4. nan and inf -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "+nan"])
def test_string_field_keeps_nan_and_inf_as_text(text):
    assert load_config(None, [f"name={text}"]).name == text


@pytest.mark.parametrize(
    ("override", "field", "default"),
    [
        ("clients.lr=inf", "clients.lr", "0.01"),
        ("clients.lr=nan", "clients.lr", "0.01"),
        ("server.lr=-inf", "server.lr", "0.003"),
        ("clients.lr=1e999", "clients.lr", "0.01"),
        ("simulation.round_timeout=inf", "simulation.round_timeout", "600.0"),
        ("faults.dropout=nan", "faults.dropout", "0.0"),
        ("privacy.delta=nan", "privacy.delta", "1e-05"),
    ],
)
def test_float_field_rejects_nan_and_inf(override, field, default):
    err = config_error(override)
    value = override.split("=", 1)[1]
    assert err.field == field
    assert "must be a finite number" in err.reason and repr(value) in err.reason
    assert f"the default is {default}" in err.reason


def test_optional_float_rejects_nan():
    err = config_error("simulation.num_gpus=nan")
    assert err.field == "simulation.num_gpus" and "finite" in err.reason


def test_toml_nan_and_inf_are_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[clients]\nlr = nan\n")
    err = config_error(source=path)
    assert err.field == "clients.lr" and "must be a finite number, got nan" in err.reason
    path.write_text("[partition]\nalpha = inf\n")
    err = config_error(source=path)
    assert err.field == "partition.alpha" and "finite" in err.reason


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_strategy_params_reject_nan_and_inf(value, tmp_path):
    from fedkd.selection import server_strategy

    with pytest.raises(ConfigError) as err:
        server_strategy(load_config(None, [f"strategy.temperature={value}"]))
    assert err.value.field == "strategy.temperature"
    assert "must be a finite number" in err.value.reason and "3.0" in err.value.reason
    path = tmp_path / "s.toml"
    path.write_text(f'[strategy]\nname = "kd"\nkd_weight = {value}\n')
    with pytest.raises(ConfigError) as err:
        server_strategy(load_config(path))
    assert err.value.field == "strategy.kd_weight" and "finite" in err.value.reason


def test_strategy_params_table_written_out_points_to_the_flat_form():
    from fedkd.selection import server_strategy

    with pytest.raises(ConfigError) as err:
        server_strategy(load_config(None, ["strategy.params.temperature=nan"]))
    assert err.value.field == "strategy.params"
    assert "strategy.temperature=" in err.value.reason


def test_dataclasses_reject_nan_however_built():
    with pytest.raises(ConfigError) as err:
        from_dict(Config, {"clients": {"lr": float("nan")}})
    assert err.value.field == "clients.lr"
    with pytest.raises(ConfigError) as err:
        ClientsConfig(lr=float("nan"))
    assert err.value.field == "lr" and "finite" in err.value.reason


def test_dataset_params_reject_nan():
    err = config_error("data.dataset.iid_noise_scale=nan")
    assert err.field == "data.dataset.iid_noise_scale"
    assert "finite" in err.reason and "0.02" in err.reason
    err = config_error("data.dataset=synthetic", "data.dataset.class_sep=inf")
    assert err.field == "data.dataset.class_sep" and "finite" in err.reason


# --- 5. other bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["seed=-1"], "seed", "must be >= 0"),
        (["clients.count=20", "data.private=10"], "clients.count", "clients.count <= 10"),
        (["data.dataset.seed=5"], "data.dataset.seed", "set the run's seed"),
        (["data.dataset.num_samples=5"], "data.dataset.num_samples", "data.private"),
        (["data.dataset.train_split=0.5"], "data.dataset.train_split", "unknown"),
        (["data.dataset.shuffle_seq=1"], "data.dataset.shuffle_seq", "expected bool"),
        (
            ["data.dataset=synthetic", "data.dataset.informative=3"],
            "data.dataset.informative",
            "informative >= 4",
        ),
        (
            ["data.dataset=synthetic", "data.dataset.num_classes=1"],
            "data.dataset.num_classes",
            "must be >= 2",
        ),
        (
            ["data.dataset=synthetic", "data.dataset.num_features=0"],
            "data.dataset.num_features",
            "must be >= 1",
        ),
    ],
)
def test_other_bad_values(overrides, field, words):
    err = config_error(*overrides)
    assert err.field == field
    assert words in err.reason
