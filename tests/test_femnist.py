"""FEMNIST from LEAF's JSON shards, and the writer (natural) partitioner.

The shards are tiny but in LEAF's format (data/femnist/preprocess/data_to_json.py and
data/utils/split_data.py): ``{"users", "num_samples", "user_data": {writer: {"x", "y"}}}``
with every image 784 floats, background 1.0 and ink near 0. Every test image carries full
ink at pixel (row 0, column 0); training images never do, so test rows can be traced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedkd.config import Config, ConfigError, load_config
from fedkd.data import (
    PARTITIONERS,
    FederatedData,
    Pool,
    build_federated_data,
    prepare_federated_data,
)
from fedkd.data.femnist import FEMNIST_CLASSES
from fedkd.data.prepare import check_data_config, data_key
from fedkd.data.readers import CorruptFileError, expected_files, read_split

WRITERS, SHARDS = 8, 2
TRAIN_PER_WRITER = (6, 7, 8, 9, 6, 7, 8, 9)
TEST_PER_WRITER = 2
Ink = dict[str, tuple[list[str], np.ndarray, np.ndarray]]  # split -> (writers, ink, labels)


def writer_id(i: int) -> str:
    return f"f{i:04d}_{(7 * i) % 100:02d}"  # LEAF's style: form id, writer


def labels_of(i: int, n: int) -> list[int]:
    """Half digits (0-9), half letters (10-61), so every class subset has rows."""
    return [(j + i) % 10 if j % 2 == 0 else 10 + (5 * j + 3 * i) % 52 for j in range(n)]


def write_leaf(root: Path, seed: int = 0) -> Ink:
    """root/femnist/data/{train,test}/all_data_<k>_niid_0_keep_0_<split>_9.json.

    Returns, per split in reading order (shards by name, users in order), each row's
    writer, ink as uint8 (row-major 28x28, MNIST's convention) and label.
    """
    rng = np.random.default_rng(seed)
    out: Ink = {}
    for split in ("train", "test"):
        folder = root / "femnist" / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        groups, inks, labels = [], [], []
        per_shard = WRITERS // SHARDS
        for k in range(SHARDS):
            users, counts, user_data = [], [], {}
            for i in range(k * per_shard, (k + 1) * per_shard):
                n = TRAIN_PER_WRITER[i] if split == "train" else TEST_PER_WRITER
                ink = np.zeros((n, 784), dtype=np.uint8)
                for row in ink:
                    spots = rng.choice(np.arange(1, 784), size=30, replace=False)
                    row[spots] = rng.integers(1, 256, size=30)
                ink[:, 0] = 255 if split == "test" else 0
                y = labels_of(i, n)
                w = writer_id(i)
                users.append(w)
                counts.append(n)
                user_data[w] = {"x": ((255 - ink) / 255).tolist(), "y": y}  # LEAF: 1 = white
                groups += [w] * n
                inks.append(ink)
                labels += y
            name = f"all_data_{k}_niid_0_keep_0_{split}_9.json"
            shard = {"users": users, "num_samples": counts, "user_data": user_data}
            (folder / name).write_text(json.dumps(shard))
        out[split] = (groups, np.concatenate(inks), np.array(labels))
    return out


@pytest.fixture(scope="module")
def leaf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ink]:
    root = tmp_path_factory.mktemp("leaf")
    return root, write_leaf(root)


def as_ink(x: np.ndarray) -> np.ndarray:
    """Images read in MNIST's convention back to uint8 ink, flattened row by row."""
    return np.rint(x.reshape(len(x), -1) * 255).astype(np.uint8)


def keys(ink: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in ink]


# ----------------------------------------------------------------------------- reader


def test_read_leaf_shards(leaf: tuple[Path, Ink]) -> None:
    root, data = leaf
    for split in ("train", "test"):
        groups, ink, labels = data[split]
        out = read_split("femnist", root, split)
        n = len(labels)
        assert out.x.shape == (n, 1, 28, 28) and out.x.dtype == np.float32
        assert out.x.flags.c_contiguous and out.x.min() >= 0.0 and out.x.max() <= 1.0
        assert out.y.dtype == np.int64 and out.y.tolist() == labels.tolist()
        assert out.groups is not None and out.groups.tolist() == groups
        # MNIST's convention: background 0, ink high; upright, row-major
        np.testing.assert_array_equal(as_ink(out.x), ink)
        assert np.median(out.x) == 0.0
        assert (out.x[:, 0, 0, 0] == 1.0).all() == (split == "test")
        assert out.num_classes == 62 and out.classes == FEMNIST_CLASSES
        assert out.classes[:11] == (*"0123456789", "A") and out.classes[36] == "a"
        folder = root / "femnist" / "data" / split
        assert out.source == folder
        assert [p.name for p in out.files] == sorted(p.name for p in folder.glob("*.json"))


def test_leaf_convention_kept_without_invert(leaf: tuple[Path, Ink]) -> None:
    root, data = leaf
    raw = read_split("femnist", root, "test", invert=False)
    inverted = read_split("femnist", root, "test")
    np.testing.assert_allclose(raw.x, 1.0 - inverted.x, atol=1e-6)
    assert np.median(raw.x) == 1.0 and (raw.x[:, 0, 0, 0] == 0.0).all()


@pytest.mark.parametrize(
    ("classes", "low", "count", "first"),
    [("digits", 0, 10, "0"), ("letters", 10, 52, "A"), ("uppercase", 10, 26, "A")]
    + [("lowercase", 36, 26, "a"), ("all", 0, 62, "0")],
)
def test_class_subsets(
    leaf: tuple[Path, Ink], classes: str, low: int, count: int, first: str
) -> None:
    root, data = leaf
    groups, ink, labels = data["train"]
    out = read_split("femnist", root, "train", classes=classes)
    keep = (labels >= low) & (labels < low + count)
    assert out.num_classes == count and out.classes[0] == first
    assert out.y.tolist() == (labels[keep] - low).tolist()
    assert out.groups.tolist() == np.array(groups)[keep].tolist()
    np.testing.assert_array_equal(as_ink(out.x), ink[keep])


def test_expected_files_name_the_folders() -> None:
    assert expected_files("femnist", "train") == [Path("femnist/data/train")]
    assert expected_files("femnist", "test", classes="digits") == [Path("femnist/data/test")]


@pytest.mark.parametrize(
    ("options", "field"),
    [({"classes": "greek"}, "data.dataset.classes"), ({"invert": "yes"}, "data.dataset.invert")]
    + [({"subset": "digits"}, "data.dataset")],
)
def test_bad_options(tmp_path: Path, options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        read_split("femnist", tmp_path, "train", **options)
    assert err.value.field == field


@pytest.mark.parametrize("state", ["absent", "empty", "other files"])
def test_missing_folder(tmp_path: Path, state: str) -> None:
    folder = tmp_path / "femnist" / "data" / "train"
    if state != "absent":
        folder.mkdir(parents=True)
    if state == "other files":
        (folder / "README.txt").write_text("not a shard")
    with pytest.raises(ConfigError) as err:
        read_split("femnist", tmp_path, "train")
    message = str(err.value)
    assert err.value.field == "data.root" and "\n" not in message
    assert not isinstance(err.value, CorruptFileError)
    assert str(tmp_path) in message and "FEMNIST train split" in message
    assert "femnist/data/train/*.json" in message and "LEAF's layout" in message
    assert "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample" in message
    assert "github.com/TalwalkarLab/leaf" in message and "flwrlabs/femnist" in message
    assert "cannot download" in message and "data.download = true" not in message


def test_missing_files_fail_fast_in_config_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="femnist/data/test/\\*.json is missing") as err:
        (tmp_path / "femnist" / "data" / "train").mkdir(parents=True)
        (tmp_path / "femnist" / "data" / "train" / "a.json").write_text("{}")
        check_data_config(config(tmp_path))
    assert err.value.field == "data.root"


def _shard(**changes: object) -> dict:
    x = [[1.0] * 784, [0.5] * 784]
    shard = {"users": ["w1"], "num_samples": [2], "user_data": {"w1": {"x": x, "y": [3, 4]}}}
    for key, value in changes.items():
        if key in ("x", "y"):
            shard["user_data"]["w1"][key] = value
        else:
            shard[key] = value
    return shard


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"users": ["w1"], "user_data": {"w1": {"x": [[0.1', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ([1, 2, 3], "expected LEAF's JSON object"),
        (_shard(user_data=None), "expected LEAF's JSON object"),
        (_shard(users=["w2"]), "user 'w2' has no 'x' and 'y'"),
        (_shard(num_samples=[2, 3]), "one count per user"),
        (_shard(num_samples=[5]), "says user 'w1' has 5 samples, not 2"),
        (_shard(x=[[1.0] * 783, [1.0] * 783]), "images of 784 numbers"),
        (_shard(x=[[1.0] * 784, [1.0] * 783]), "images of 784 numbers"),
        (_shard(x=[["a"] * 784, [1.0] * 784]), "images of 784 numbers"),
        (_shard(x=[[1.5] * 784, [1.0] * 784]), "pixel values must lie in [0, 1]"),
        (_shard(y=[3]), "1 labels for 2 images"),
        (_shard(y=[3, 62]), "labels must lie in 0..61, found 3..62"),
        (_shard(y=[3.0, 4.5]), "integer labels"),
    ],
)
def test_malformed_shard(tmp_path: Path, content: object, message: str) -> None:
    folder = tmp_path / "femnist" / "data" / "train"
    folder.mkdir(parents=True)
    (folder / "a_good.json").write_text(json.dumps(_shard()))
    bad = folder / "b_bad.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CorruptFileError) as err:
        read_split("femnist", tmp_path, "train")
    assert err.value.path == bad and err.value.field == "data.root"
    assert str(bad) in str(err.value) and message in str(err.value)


# ----------------------------------------------------------------------------- partitioner


def by_writer(groups: np.ndarray, parts: list[np.ndarray]) -> list[set[str]]:
    """Each client's writers, checking it holds every row of each of them."""
    out = []
    for rows in parts:
        mine = set(groups[rows].tolist())
        assert set(np.flatnonzero(np.isin(groups, list(mine)))) == set(rows.tolist())
        out.append(mine)
    return out


GROUPS = np.repeat([f"w{i:02d}" for i in range(12)], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
LABELS = np.arange(len(GROUPS)) % 10


def test_writer_partition_deals_whole_writers() -> None:
    writer = PARTITIONERS.get("writer")
    assert PARTITIONERS.get("natural") is writer
    parts = writer(LABELS, 5, 42, groups=GROUPS)
    assert len(parts) == 5 and all(p.dtype == np.int64 for p in parts)
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted, no repeats
    writers = by_writer(GROUPS, parts)
    assert sorted(len(w) for w in writers) == [2, 2, 2, 3, 3]  # 12 writers round-robin
    assert sum(len(p) for p in parts) == len(GROUPS)
    again = writer(LABELS, 5, 42, groups=GROUPS)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = writer(LABELS, 5, 7, groups=GROUPS)
    assert by_writer(GROUPS, other) != writers


def test_writers_per_client() -> None:
    writer = PARTITIONERS.get("writer")
    parts = writer(LABELS, 4, 0, groups=GROUPS, writers_per_client=2)
    writers = by_writer(GROUPS, parts)
    assert [len(w) for w in writers] == [2, 2, 2, 2]
    assert len(set().union(*writers)) == 8  # 4 of the 12 writers unused
    assert sum(len(p) for p in parts) < len(GROUPS)
    one = writer(LABELS, 12, 0, groups=GROUPS, writers_per_client=1)
    assert [len(w) for w in by_writer(GROUPS, one)] == [1] * 12


@pytest.mark.parametrize(
    ("clients", "per_client", "field", "message"),
    [
        (13, 0, "partition", "from 12 writers, but clients.count=13 needs one writer per client"),
        (5, 3, "partition", "clients.count=5 x partition.writers_per_client=3 needs 15"),
        (5, 3, "partition", "use clients.count <= 4, fewer partition.writers_per_client"),
        (4, -1, "partition.writers_per_client", "must be >= 0"),
        (4, 20, "partition.writers_per_client", "4 clients x 20 writers need at least 80"),
    ],
)
def test_writer_partition_errors(clients: int, per_client: int, field: str, message: str) -> None:
    writer = PARTITIONERS.get("writer")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as err:
        writer(LABELS, clients, 0, groups=GROUPS, writers_per_client=per_client)
    assert err.value.field == field


def test_writer_partition_needs_writer_ids() -> None:
    with pytest.raises(ConfigError, match="datasets with writers: femnist") as err:
        PARTITIONERS.get("writer")(LABELS, 3, 0, groups=None)
    assert err.value.field == "partition"


# ----------------------------------------------------------------------------- federation


def config(root: Path, *overrides: str) -> Config:
    """FEMNIST from ``root``, not normalised (arrays compare with the shards as read)."""
    base = ["data.dataset=femnist", f"data.root={root}", "data.private=40", "data.public=10"]
    more = ["data.test=0", "clients.count=4", "partition=writer", "data.normalize=false"]
    return load_config(None, [*base, *more, *overrides])


def test_federated_femnist_by_writer(
    leaf: tuple[Path, Ink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = leaf
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = config(root)
    fed, path = prepare_federated_data(cfg)
    train_groups, train_ink, train_y = data["train"]
    writer_of = dict(zip(keys(train_ink), train_groups, strict=True))
    label_of = dict(zip(keys(train_ink), train_y.tolist(), strict=True))
    private = keys(as_ink(fed.private_x))
    assert fed.private_groups is not None and len(fed.private_groups) == 40
    assert [writer_of[k] for k in private] == fed.private_groups.tolist()  # rows' own writers
    assert [label_of[k] for k in private] == fed.private_y.tolist()
    writers = by_writer(fed.private_groups, fed.parts)  # whole writers per client
    assert all(writers) and not set.intersection(*writers)
    assert sum(len(p) for p in fed.parts) == 40
    assert {writer_of[k] for k in keys(as_ink(fed.public_x))} <= set(train_groups)
    assert not set(private) & set(keys(as_ink(fed.public_x)))
    # the test set is the whole test split; no test image is private or public
    assert len(fed.test_y) == len(data["test"][2]) and (fed.test_x[:, 0, 0, 0] == 1.0).all()
    assert (fed.private_x[:, 0, 0, 0] == 0.0).all() and (fed.public_x[:, 0, 0, 0] == 0.0).all()
    assert fed.input_shape == (1, 28, 28) and fed.num_classes == 62
    client = fed.client(0)
    assert set(keys(as_ink(client.x))) <= set(private)
    # cached with the writer ids; the same split again
    again, same = prepare_federated_data(cfg)
    assert same == path and path.name.startswith("femnist-")
    assert again.private_groups is not None
    assert again.private_groups.tolist() == fed.private_groups.tolist()
    assert all(np.array_equal(a, b) for a, b in zip(again.parts, fed.parts, strict=True))
    again_built = build_federated_data(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(again_built.parts, fed.parts, strict=True))


def test_writers_per_client_and_digits(leaf: tuple[Path, Ink]) -> None:
    root, data = leaf
    digits = ["data.dataset.classes=digits", "data.private=20", "data.public=5"]
    fed = build_federated_data(
        config(root, *digits, "clients.count=3", "partition.writers_per_client=2")
    )
    assert fed.num_classes == 10 and fed.private_y.max() < 10
    writers = by_writer(fed.private_groups, fed.parts)
    assert [len(w) for w in writers] == [2, 2, 2]
    assert (fed.test_y < 10).all() and len(fed.test_y) == int((data["test"][2] < 10).sum())


def test_too_few_writers_for_the_clients(leaf: tuple[Path, Ink]) -> None:
    root, _ = leaf
    with pytest.raises(ConfigError, match="from 8 writers, but clients.count=9") as err:
        build_federated_data(config(root, "clients.count=9"))
    assert err.value.field == "partition"


def test_writer_partition_on_data_without_writers() -> None:
    cfg = load_config(None, ["partition=writer"])  # mnist1d
    with pytest.raises(ConfigError, match="'mnist1d' has no writer ids") as err:
        check_data_config(cfg)
    assert err.value.field == "partition" and "femnist" in str(err.value)
    with pytest.raises(ConfigError, match="set by fedkd at run time") as err:
        check_data_config(load_config(None, ["partition=natural", "partition.groups=1"]))
    assert err.value.field == "partition.groups"


SEEN: list[object] = []


def takes_writers(
    labels: np.ndarray, num_clients: int, seed: int, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """A user partitioner that uses writer ids where the data has them (optional)."""
    SEEN.append(groups)
    return [p.astype(np.int64) for p in np.array_split(np.arange(len(labels)), num_clients)]


def ignores_writers(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    SEEN.append("no groups")
    return [p.astype(np.int64) for p in np.array_split(np.arange(len(labels)), num_clients)]


def pool(num_samples: int, seed: int) -> Pool:
    """A generated dataset (no writers), cheap to make."""
    rng = np.random.default_rng(seed)
    return Pool(rng.random((num_samples, 4), dtype=np.float32), np.arange(num_samples) % 3, 3)


def test_groups_reach_only_partitioners_that_declare_them(leaf: tuple[Path, Ink]) -> None:
    root, _ = leaf
    SEEN.clear()
    fed = build_federated_data(config(root, "partition='tests.test_femnist:takes_writers'"))
    assert isinstance(SEEN[-1], np.ndarray) and SEEN[-1].tolist() == fed.private_groups.tolist()
    fed = build_federated_data(config(root, "partition='tests.test_femnist:ignores_writers'"))
    assert SEEN[-1] == "no groups" and fed.private_groups is not None  # kept all the same
    small = ["data.dataset='tests.test_femnist:pool'", "data.private=40", "data.public=10"]
    fed = build_federated_data(
        load_config(
            None, [*small, "clients.count=4", "partition='tests.test_femnist:takes_writers'"]
        )
    )
    assert SEEN[-1] is None and fed.private_groups is None


def test_cache_key_follows_every_shard(
    leaf: tuple[Path, Ink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy"
    write_leaf(copy)
    key = data_key(config(copy))
    assert data_key(config(copy)) == key and data_key(config(leaf[0])) != key
    assert data_key(config(copy, "data.dataset.classes=letters")) != key
    shard = copy / "femnist" / "data" / "train" / "all_data_1_niid_0_keep_0_train_9.json"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = data_key(config(copy))
    assert touched != key
    (shard.parent / "all_data_2_niid_0_keep_0_train_9.json").write_text(json.dumps(_shard()))
    assert data_key(config(copy)) != touched  # a shard added


def test_cache_without_writer_ids_loads(tmp_path: Path) -> None:
    fed = FederatedData(
        *(np.zeros((4, 2), np.float32), np.arange(4)),
        [np.array([0, 1]), np.array([2, 3])],
        *(np.zeros((1, 2), np.float32), np.zeros(1, np.int64)),
        *(np.zeros((1, 2), np.float32), np.zeros(1, np.int64)),
        2,
    )
    fed.save(tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as z:
        assert "private_groups" not in z.files
    assert FederatedData.load(tmp_path / "old.npz").private_groups is None


def test_femnist_proxy_sets(leaf: tuple[Path, Ink]) -> None:
    root, _ = leaf
    letters = ["data.dataset.classes=letters", "data.private=20"]
    fed = build_federated_data(
        config(root, *letters, "data.public={dataset='femnist', classes='digits', size=8}")
    )
    assert len(fed.public_x) == 8 and (fed.public_y == -1).all()
    assert not set(keys(as_ink(fed.public_x))) & set(keys(as_ink(fed.private_x)))
    with pytest.raises(ConfigError, match="overlapping") as err:
        check_data_config(
            config(root, *letters, "data.public={dataset='femnist', classes='all', size=8}")
        )
    assert err.value.field == "data.public"
    same = build_federated_data(
        config(root, "data.public={dataset='femnist', size=8, labelled=true, invert=false}")
    )
    assert (same.public_y >= 0).all() and np.median(same.public_x) == 1.0  # LEAF's convention
    private = set(keys(as_ink(same.private_x)))
    assert not {row.tobytes() for row in as_ink(1.0 - same.public_x)} & private
