"""Datasets, partitioners and the federation's disjoint splits."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fedkd.config import Config, ConfigError, load_config
from fedkd.data import DATASETS, PARTITIONERS, FederatedData, prepare_federated_data
from fedkd.data.prepare import build_federated_data, check_data_config, data_key
from fedkd.registry import UnknownNameError
from fedkd.seeding import derive_seed

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)

SMALL = ("data.private=600", "data.public=200", "data.test=200", "clients.count=5")
DATASET_NAMES = ["mnist1d", "digits", "synthetic"]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


@functools.cache
def built(*overrides: str) -> FederatedData:
    """Build once per distinct config (tests only read the arrays)."""
    return build_federated_data(tiny_config(*overrides))


def row_keys(x: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(r).tobytes() for r in x]


def row_set(x: np.ndarray) -> set[bytes]:
    return set(row_keys(x))


def label_entropy(data: FederatedData) -> float:
    """Mean over clients of the entropy of the client's label distribution."""
    out = []
    for rows in data.parts:
        p = np.bincount(data.private_y[rows], minlength=data.num_classes) / len(rows)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def assert_exact_cover(data: FederatedData) -> None:
    rows = np.concatenate(data.parts)
    assert len(rows) == len(np.unique(rows)), "a private row is in two partitions"
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(data.private_y)))


# --- splits --------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_split_sizes_shapes_and_dtypes(dataset):
    data = built(f"data.dataset={dataset}")
    assert len(data.private_x) == len(data.private_y) == 600
    assert len(data.public_x) == len(data.public_y) == 200
    assert len(data.test_x) == len(data.test_y) == 200
    assert data.num_classes == 10
    expected_shape = {"mnist1d": (40,), "digits": (64,), "synthetic": (20,)}[dataset]
    assert data.input_shape == expected_shape
    for x in (data.private_x, data.public_x, data.test_x):
        assert x.dtype == np.float32 and x.shape[1:] == expected_shape
        assert np.isfinite(x).all()
    for y in (data.private_y, data.public_y, data.test_y):
        assert y.dtype == np.int64
        assert y.min() >= 0 and y.max() < 10
    assert len(np.unique(data.private_y)) == 10


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_splits_are_disjoint(dataset):
    data = built(f"data.dataset={dataset}")
    private, public, test = (row_set(x) for x in (data.private_x, data.public_x, data.test_x))
    # rows are unique within each split (no sample drawn twice) ...
    assert (len(private), len(public), len(test)) == (600, 200, 200)
    # ... and no sample is in two splits
    assert not private & public
    assert not private & test
    assert not public & test


def _pool(dataset: str, seed: int):
    return DATASETS.get(dataset)(1000, derive_seed(seed, "dataset"))


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_split_rows_keep_their_labels(dataset):
    data = built(f"data.dataset={dataset}")
    pool = _pool(dataset, 0)
    label_of = dict(zip(row_keys(pool.x), pool.y.tolist(), strict=True))
    assert len(label_of) == len(pool.y)  # the pool's rows are unique
    for x, y in (
        (data.private_x, data.private_y),
        (data.public_x, data.public_y),
        (data.test_x, data.test_y),
    ):
        assert [label_of[key] for key in row_keys(x)] == y.tolist()


def test_mnist1d_pool_uses_the_seed():
    a, b, c = (DATASETS.get("mnist1d")(100, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.input_shape == (40,)


def test_building_data_leaves_global_rngs_alone():
    import random

    np.random.seed(1234)
    random.seed(1234)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(1234)
    random.seed(1234)
    build_federated_data(tiny_config("seed=5"))
    assert np.random.random() == expected_np
    assert random.random() == expected_py


# --- partitions ----------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASET_NAMES)
@pytest.mark.parametrize(
    "partition",
    [
        (),
        ("partition=iid",),
        ("partition.alpha=0.1",),
        ("partition=shard",),
        ("clients.count=10", "partition=pathological"),
    ],
    ids=["dirichlet", "iid", "dirichlet-0.1", "shard", "pathological-10-clients"],
)
def test_partitions_cover_private_set_exactly_once(dataset, partition):
    data = built(f"data.dataset={dataset}", *partition)
    assert len(data.parts) == (10 if "clients.count=10" in partition else 5)
    assert all(len(rows) > 0 for rows in data.parts)
    assert all(rows.dtype == np.int64 for rows in data.parts)
    assert_exact_cover(data)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_cover_sizes_not_divisible_by_clients(partition):
    data = build_federated_data(
        tiny_config("data.dataset=synthetic", "data.private=603", f"partition={partition}")
    )
    assert_exact_cover(data)


@pytest.mark.parametrize(
    ("overrides", "unassigned"),
    [
        # FedAvg shards: 603 rows make 10 shards of 60; the 3 left over go to nobody.
        (("data.dataset=synthetic", "data.private=603", "partition=shard"), 3),
        # 5 clients x 2 classes cannot hold all 10 classes: the undrawn ones go to nobody.
        (("partition=pathological",), None),
    ],
    ids=["shard-remainder", "pathological-undrawn-classes"],
)
def test_unassigned_private_rows_are_logged(overrides, unassigned, caplog):
    with caplog.at_level("WARNING", logger="fedkd"):
        data = build_federated_data(tiny_config(*overrides))
    rows = np.concatenate(data.parts)
    assert len(rows) == len(np.unique(rows)), "a private row is in two partitions"
    missing = len(data.private_y) - len(rows)
    assert missing > 0 and (unassigned is None or missing == unassigned)
    assert f"the other {missing} belong to no client" in caplog.text


def test_every_client_gets_data_and_client_view_matches_parts():
    data = built()
    total = 0
    for cid, rows in enumerate(data.parts):
        view = data.client(cid)
        assert len(view.y) == len(rows) > 0
        np.testing.assert_array_equal(view.x, data.private_x[rows])
        np.testing.assert_array_equal(view.y, data.private_y[rows])
        assert view.public_x is data.public_x
        assert view.test_x is data.test_x and view.test_y is data.test_y
        assert view.num_classes == 10
        total += len(view.y)
    assert total == 600


def test_iid_partition_is_balanced():
    data = built("partition=iid")
    assert [len(rows) for rows in data.parts] == [120] * 5


def test_dirichlet_is_label_skewed_compared_to_iid():
    iid, mild, skewed = built("partition=iid"), built(), built("partition.alpha=0.1")
    assert label_entropy(skewed) < label_entropy(mild) < label_entropy(iid)
    assert label_entropy(skewed) < 0.75 * label_entropy(iid)
    assert label_entropy(iid) > 0.95 * np.log(10)  # iid clients see every class evenly


def test_dirichlet_respects_min_size():
    data = built("partition.alpha=0.1", "partition.min_size=50")
    assert min(len(rows) for rows in data.parts) >= 50


def test_dirichlet_min_size_too_large():
    with pytest.raises(ConfigError) as err:
        build_federated_data(tiny_config("data.dataset=synthetic", "partition.min_size=121"))
    assert err.value.field == "partition.min_size"


@pytest.mark.parametrize("k", [1, 2])
def test_pathological_limits_classes_per_client(k):
    data = built("partition=pathological", f"partition.classes_per_client={k}")
    for rows in data.parts:
        assert len(rows) > 0
        assert len(np.unique(data.private_y[rows])) <= k
    assert label_entropy(data) < label_entropy(built("partition=iid"))


def test_pathological_bad_classes_per_client():
    with pytest.raises(ConfigError) as err:
        build_federated_data(
            tiny_config(
                "data.dataset=synthetic",
                "partition=pathological",
                "partition.classes_per_client=11",
            )
        )
    assert err.value.field == "partition.classes_per_client"


def test_shard_partition():
    data = built("partition=shard")
    assert [len(rows) for rows in data.parts] == [120] * 5
    assert_exact_cover(data)
    assert label_entropy(data) < label_entropy(built("partition=iid"))
    with pytest.raises(ConfigError) as err:
        build_federated_data(
            tiny_config(
                "data.dataset=synthetic", "partition=shard", "partition.shards_per_client=0"
            )
        )
    assert err.value.field == "partition.shards_per_client"


@pytest.mark.parametrize("alpha", ["0", "0.0", "-1"])
def test_non_positive_alpha(alpha):
    with pytest.raises(ConfigError, match="must be > 0") as err:
        build_federated_data(tiny_config("data.dataset=synthetic", f"partition.alpha={alpha}"))
    assert err.value.field == "partition.alpha"
    with pytest.raises(ConfigError) as err:
        PARTITIONERS.get("dirichlet")(np.arange(100) % 10, 5, 0, alpha=float(alpha))
    assert err.value.field == "partition.alpha"


# --- seeds ---------------------------------------------------------------------------


ARRAYS = ("private_x", "private_y", "public_x", "public_y", "test_x", "test_y")


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_same_seed_same_data(dataset):
    a = build_federated_data(tiny_config(f"data.dataset={dataset}"))
    b = built(f"data.dataset={dataset}")
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert len(a.parts) == len(b.parts)
    for pa, pb in zip(a.parts, b.parts, strict=True):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_different_seed_different_split(dataset):
    a, b = built(f"data.dataset={dataset}"), built(f"data.dataset={dataset}", "seed=1")
    assert row_set(a.private_x) != row_set(b.private_x)
    assert row_set(a.test_x) != row_set(b.test_x)
    assert [len(p) for p in a.parts] != [len(p) for p in b.parts]


# --- names and parameters ------------------------------------------------------------


def test_registered_names():
    assert {"mnist1d", "digits", "synthetic", "hf"} <= set(DATASETS.names())
    assert {"iid", "dirichlet", "pathological", "shard"} <= set(PARTITIONERS.names())


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown dataset 'mnist2d'") as err:
        check_data_config(tiny_config("data.dataset=mnist2d"))
    for name in ("mnist1d", "digits", "synthetic"):
        assert name in str(err.value)


def test_unknown_partitioner_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown partitioner 'dirichlett'") as err:
        check_data_config(tiny_config("partition=dirichlett"))
    for name in ("iid", "dirichlet", "pathological", "shard"):
        assert name in str(err.value)


def test_unknown_plugin_params_name_their_field():
    with pytest.raises(ConfigError) as err:
        check_data_config(tiny_config("partition.beta=1"))
    assert err.value.field == "partition.beta"
    with pytest.raises(ConfigError) as err:
        check_data_config(tiny_config("data.dataset=synthetic", "data.dataset.num_feature=5"))
    assert err.value.field == "data.dataset.num_feature"
    with pytest.raises(ConfigError) as err:  # mnist1d takes **overrides: checked when built
        build_federated_data(tiny_config("data.dataset.no_such_arg=1"))
    assert err.value.field == "data.dataset.no_such_arg"


def test_dataset_params_are_used():
    data = built(
        "data.dataset={name = 'synthetic', num_features = 7, informative = 4, num_classes = 3}"
    )
    assert data.input_shape == (7,)
    assert data.num_classes == 3
    assert set(np.unique(data.private_y)) == {0, 1, 2}


def test_dataset_too_small():
    with pytest.raises(ConfigError, match="has 1797 samples") as err:
        build_federated_data(tiny_config("data.dataset=digits", "data.private=1600"))
    assert err.value.field == "data"


def test_mnist1d_any_total_size():
    data = build_federated_data(tiny_config("data.private=605"))
    assert len(data.private_y) == 605


# --- saving, loading and the cache ---------------------------------------------------


def assert_same_data(a: FederatedData, b: FederatedData) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.num_classes == b.num_classes
    assert len(a.parts) == len(b.parts)
    for pa, pb in zip(a.parts, b.parts, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_save_load_round_trip(tmp_path):
    data = built("partition.alpha=0.1")
    path = tmp_path / "fed.npz"
    data.save(path)
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["fed.npz"]  # no temporary left behind
    assert_same_data(FederatedData.load(path), data)


def test_save_load_single_client(tmp_path):
    data = build_federated_data(tiny_config("data.dataset=synthetic", "clients.count=1"))
    data.save(tmp_path / "one.npz")
    loaded = FederatedData.load(tmp_path / "one.npz")
    assert len(loaded.parts) == 1
    assert_same_data(loaded, data)


def test_prepare_caches_on_disk(tmp_path, monkeypatch):
    import fedkd.data.prepare as federation

    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path))
    cfg = tiny_config("data.dataset=synthetic")
    data, path = prepare_federated_data(cfg)
    assert path.is_file()
    assert path.parent == tmp_path / "data"
    assert_same_data(data, built("data.dataset=synthetic"))

    def no_rebuild(config):
        raise AssertionError("the cached file should have been used")

    rebuild = federation.build_federated_data
    monkeypatch.setattr(federation, "build_federated_data", no_rebuild)
    again, again_path = prepare_federated_data(cfg)
    assert again_path == path
    assert_same_data(again, data)
    # a setting that does not change the data shares the file; the seed does not
    assert prepare_federated_data(load_config(cfg, ["rounds=2"]))[1] == path
    monkeypatch.setattr(federation, "build_federated_data", rebuild)
    other, other_path = prepare_federated_data(load_config(cfg, ["seed=1"]))
    assert other_path != path and other_path.is_file()
    assert not np.array_equal(other.private_x, data.private_x)


def test_data_key_depends_on_exactly_the_data_fields():
    base = tiny_config()
    key = data_key(base)
    for same in (["rounds=3"], ["clients.lr=0.5"], ["strategy.temperature=1.0"]):
        assert data_key(load_config(base, same)) == key, same
    for other in (
        ["seed=1"],
        ["data.private=700"],
        ["data.public=100"],
        ["data.test=100"],
        ["data.dataset=digits"],
        ["partition.alpha=0.1"],
        ["partition=iid"],
        ["clients.count=6"],
    ):
        assert data_key(load_config(base, other)) != key, other
