"""Official datasets with their official splits, and proxy sets of their own.

Written on tiny files in the official formats (as in tests/test_readers.py). Every test
image carries a 255 pixel at (channel 0, row 0, column 0); training images never do, so
a test sample's pattern can be traced through the splits.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from fedkd.config import Config, ConfigError, PublicSet, load_config, save_config
from fedkd.data import FederatedData, build_federated_data, prepare_federated_data
from fedkd.data.prepare import check_data_config, data_key
from fedkd.strategy import SERVER_STRATEGIES
from tests.http_server import Server
from tests.test_download import folder_blobs, targz

TRAIN_PER_BATCH, TEST = 40, 50
MARK = (0, 0, 0)  # channel, row, column of the test-set mark


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...], test: bool) -> np.ndarray:
    x = rng.integers(0, 250, size=(n, *shape), dtype=np.uint8)
    x.reshape(n, -1)[:, 0] = 255 if test else 0  # the first value: MARK once read
    return x


def _dump(path: Path, obj: dict) -> None:
    """A pickle with bytes keys, as the official CIFAR files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py: 5 x 40 training images, 50 test images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names})
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(rng, TRAIN_PER_BATCH, (3, 32, 32), test=False)
        y = rng.integers(0, 10, TRAIN_PER_BATCH).tolist()
        _dump(folder / f"data_batch_{i}", {b"data": x.reshape(len(x), -1), b"labels": y})
        xs.append(x)
        ys += y
    test_x = _images(rng, TEST, (3, 32, 32), test=True)
    test_y = rng.integers(0, 10, TEST)
    _dump(folder / "test_batch", {b"data": test_x.reshape(TEST, -1), b"labels": test_y.tolist()})
    return {"train": (np.concatenate(xs), np.array(ys)), "test": (test_x, test_y)}


def write_cifar100(root: Path, n: int = 60) -> np.ndarray:
    rng = np.random.default_rng(7)
    folder = root / "cifar-100-python"
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    _dump(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    x = _images(rng, n, (3, 32, 32), test=False)
    labels = {b"fine_labels": rng.integers(0, 100, n).tolist()}
    labels[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    _dump(folder / "train", {b"data": x.reshape(n, -1), **labels})
    return x


def write_mnist(root: Path) -> None:
    """MNIST/raw idx files, gzipped: 100 training and 20 test images."""
    rng = np.random.default_rng(3)
    for stem, n, test in (("train", 100, False), ("t10k", 20, True)):
        x = _images(rng, n, (28, 28), test)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            blob = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            path = root / "MNIST" / "raw" / f"{stem}-{kind}-ubyte.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(blob + arr.tobytes()))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("official")
    write_cifar10(folder)
    write_cifar100(folder)
    write_mnist(folder)
    return folder


def config(root: Path, *overrides: str) -> Config:
    """CIFAR-10 from ``root``, not normalised (so arrays compare with the files as read;
    the normalisation has tests of its own below)."""
    base = ["data.dataset=cifar10", f"data.root={root}", "data.private=120", "data.public=40"]
    more = ["data.test=0", "clients.count=4", "partition=iid", "data.normalize=false"]
    return load_config(None, [*base, *more, *overrides])


def rows(x: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(r).tobytes() for r in x}


def marked(x: np.ndarray) -> np.ndarray:
    """Which rows carry the test-set mark."""
    return x[(slice(None), *MARK)] == 1.0


def label_of(root: Path) -> dict[bytes, int]:
    """CIFAR-10 training image (as read: float32 / 255) -> its label."""
    x, y = write_cifar10(root / "_unused")["train"]  # same seed: the same images
    return {
        np.ascontiguousarray(a).tobytes(): int(b)
        for a, b in zip(x / np.float32(255), y, strict=True)
    }


# ----------------------------------------------------------------------------- official splits


def test_cifar10_official_splits(root: Path) -> None:
    data = build_federated_data(config(root))
    test_x, test_y = write_cifar10(root / "_again")["test"]
    assert data.test_x.shape == (TEST, 3, 32, 32)  # data.test = 0: the whole test split
    np.testing.assert_array_equal(data.test_x, test_x / np.float32(255))
    np.testing.assert_array_equal(data.test_y, test_y)
    assert marked(data.test_x).all()
    assert not marked(data.private_x).any() and not marked(data.public_x).any()
    assert (len(data.private_y), len(data.public_y)) == (120, 40)
    private, public, test = rows(data.private_x), rows(data.public_x), rows(data.test_x)
    assert (len(private), len(public), len(test)) == (120, 40, TEST)
    assert not private & public and not private & test and not public & test
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert sorted(np.concatenate(data.parts).tolist()) == list(range(120))
    labels = label_of(root)
    for x, y in ((data.private_x, data.private_y), (data.public_x, data.public_y)):
        assert [labels[np.ascontiguousarray(r).tobytes()] for r in x] == y.tolist()


def test_test_subset_seeded(root: Path) -> None:
    a = build_federated_data(config(root, "data.test=20"))
    b = build_federated_data(config(root, "data.test=20"))
    c = build_federated_data(config(root, "data.test=20", "seed=1"))
    assert len(a.test_y) == 20 and marked(a.test_x).all()
    assert rows(a.test_x) <= rows(write_cifar10(root / "_t")["test"][0] / np.float32(255))
    np.testing.assert_array_equal(a.test_x, b.test_x)
    assert rows(a.test_x) != rows(c.test_x)
    whole = build_federated_data(config(root, f"data.test={TEST + 5}"))
    assert len(whole.test_y) == TEST  # at least the split's size: all of it


def test_seeded_determinism(root: Path) -> None:
    a, b = build_federated_data(config(root)), build_federated_data(config(root))
    c = build_federated_data(config(root, "seed=3"))
    for name in ("private_x", "private_y", "public_x", "public_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts, strict=True))
    assert rows(a.private_x) != rows(c.private_x)


def test_train_split_too_small(root: Path) -> None:
    with pytest.raises(ConfigError, match="train split .* has 200 samples") as err:
        build_federated_data(config(root, "data.private=190", "data.public=20"))
    assert err.value.field == "data"


def test_mnist_gzipped(root: Path) -> None:
    cfg = load_config(
        None,
        ["data.dataset=mnist", f"data.root={root}", "data.private=60", "data.public=30"]
        + ["data.test=10", "clients.count=3", "partition=iid", "data.normalize=false"],
    )
    data = build_federated_data(cfg)
    assert data.input_shape == (1, 28, 28) and len(data.test_y) == 10
    assert marked(data.test_x).all() and not marked(data.private_x).any()


def test_test_zero_only_for_official() -> None:
    with pytest.raises(ConfigError, match="official datasets only") as err:
        load_config(None, ["data.test=0"])
    assert err.value.field == "data.test"


# ----------------------------------------------------------------------------- proxy sets


def test_cifar100_unlabelled_proxy(root: Path) -> None:
    cfg = config(root, "data.private=200", "data.public.dataset=cifar100", "data.public.size=30")
    assert cfg.data.public == PublicSet(30, cfg.data.public.dataset) and cfg.data.public.is_proxy
    data = build_federated_data(cfg)
    assert data.public_x.shape == (30, 3, 32, 32) and data.private_x.shape == (200, 3, 32, 32)
    assert (data.public_y == -1).all() and data.public_y.dtype == np.int64
    assert rows(data.public_x) <= rows(write_cifar100(root / "_c100") / np.float32(255))
    assert data.num_classes == 10
    coarse = build_federated_data(
        config(
            root, "data.private=200", "data.public={dataset='cifar100', labels='coarse', size=20}"
        )
    )
    assert coarse.public_y.shape == (20,) and (coarse.public_y == -1).all()


def test_labelled_same_dataset_proxy_keeps_labels(root: Path) -> None:
    cfg = config(
        root, "data.public={dataset='cifar10', size=40, labelled=true}", "server.public_subset=10"
    )
    data = build_federated_data(cfg)
    assert len(data.public_y) == 40 and (data.public_y >= 0).all()
    labels = label_of(root)
    assert [labels[np.ascontiguousarray(r).tobytes()] for r in data.public_x] == (
        data.public_y.tolist()
    )
    assert not rows(data.public_x) & rows(data.private_x)
    assert not marked(data.public_x).any()
    SERVER_STRATEGIES.get("fedmd").check_config(load_config(cfg, ["strategy=fedmd"]))


def test_unlabelled_same_dataset_proxy_is_disjoint(root: Path) -> None:
    data = build_federated_data(config(root, "data.public={dataset='cifar10', size=80}"))
    assert (data.public_y == -1).all() and len(data.public_x) == 80
    assert not rows(data.public_x) & rows(data.private_x) and not marked(data.public_x).any()


def test_fedmd_refuses_unlabelled_proxy(root: Path) -> None:
    from fedkd.runner import check_config

    cfg = config(root, "data.public.dataset=cifar100", "data.public.size=30", "strategy=fedmd")
    with pytest.raises(ConfigError, match="labelled public set") as err:
        check_config(cfg)
    assert err.value.field == "data.public.labelled"
    check_config(config(root, "strategy=fedmd"))  # an int data.public is labelled


def test_labels_of_another_dataset_refused(root: Path) -> None:
    cfg = config(root, "data.public={dataset='cifar100', size=30, labelled=true}")
    with pytest.raises(ConfigError, match="not in the private label space") as err:
        check_data_config(cfg)
    assert err.value.field == "data.public.labelled"


def test_proxy_from_private_test_split_refused(root: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_data_config(config(root, "data.public={dataset='cifar10', split='test', size=5}"))
    assert err.value.field == "data.public.split"


def test_shape_mismatch(root: Path) -> None:
    cfg = config(root, "data.public.dataset=mnist", "data.public.size=30")
    with pytest.raises(ConfigError, match=r"\(1, 28, 28\).*\(3, 32, 32\)") as err:
        check_data_config(cfg)
    assert err.value.field == "data.public.dataset"
    generated = load_config(
        None,
        ["data.dataset=synthetic", "data.private=100", "data.test=50", f"data.root={root}"]
        + ["data.public={dataset='cifar10', size=20}", "clients.count=2"],
    )
    with pytest.raises(ConfigError, match=r"\(3, 32, 32\).*\(20,\)") as err:
        build_federated_data(generated)
    assert err.value.field == "data.public.dataset"


def test_proxy_options_and_sizes(root: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_data_config(config(root, "data.public={dataset='cifar100', labels='medium'}"))
    assert err.value.field == "data.public.labels"
    with pytest.raises(ConfigError) as err:
        build_federated_data(config(root, "data.public={dataset='cifar100', size=61}"))
    assert err.value.field == "data.public.size"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.public={dataset='cifar100', size=30}", "server.public_subset=31"])
    assert err.value.field == "server.public_subset"


def test_proxy_config_round_trip(root: Path, tmp_path: Path) -> None:
    cfg = config(root, "data.public={dataset='cifar100', size=30, labels='coarse'}")
    assert cfg.to_dict()["data"]["public"] == {
        "dataset": "cifar100",
        "split": "train",
        "size": 30,
        "labelled": False,
        "labels": "coarse",
    }
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert load_config(None, ["data.public.size=300"]).data.public == 300  # the int form


# ----------------------------------------------------------------------------- files and cache


def test_missing_files_fail_fast(tmp_path: Path) -> None:
    from fedkd.runner import check_config

    cfg = config(tmp_path / "nowhere")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert time.perf_counter() - start < 0.5
    assert err.value.field == "data.root"
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py/data_batch_1" in message and "cifar-10-python.tar.gz" in message
    assert "data.download = true" in message  # the key that allows the download


def test_data_download_fetches_missing_files_before_anything_runs(
    root: Path, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.download = true`` runs the real downloader (here from a local HTTP server
    serving a tiny archive in the official layout) and the run's data is read from it."""
    from fedkd.data import download as dl
    from fedkd.runner import check_config

    blob = targz(folder_blobs(root / "cifar-10-batches-py", "cifar-10-batches-py/"))
    served = server.add("cifar-10-python.tar.gz", blob)
    (official,) = dl.RESOURCES["cifar10"]
    local = dl.Resource(served.urls, served.md5, official.provides)
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (local,))
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError):  # without the key: refused, nothing fetched
        check_config(config(fresh))
    assert server.hits == []
    cfg = config(fresh, "data.download=true")
    check_config(cfg)
    assert server.hits == ["/cifar-10-python.tar.gz"]
    data = build_federated_data(cfg)
    assert data.test_x.shape == (TEST, 3, 32, 32)
    check_config(cfg)  # present now: not fetched again
    assert server.hits == ["/cifar-10-python.tar.gz"]


def test_official_inputs_are_normalised_with_the_private_datasets_statistics(root: Path) -> None:
    from fedkd.data.transforms import normalize

    raw = build_federated_data(config(root, "data.public={dataset='cifar100', size=20}"))
    cfg = config(root, "data.public={dataset='cifar100', size=20}", "data.normalize=true")
    data = build_federated_data(cfg)
    for split in ("private_x", "public_x", "test_x"):  # the proxy set with CIFAR-10's stats
        np.testing.assert_allclose(
            getattr(data, split), normalize(getattr(raw, split), "cifar10"), rtol=1e-6
        )
    np.testing.assert_array_equal(data.private_y, raw.private_y)
    assert data_key(cfg) != data_key(config(root, "data.public={dataset='cifar100', size=20}"))
    mnist1d = load_config(None, ["data.normalize=false"])
    assert data_key(mnist1d) == data_key(load_config(None, []))  # offline data: untouched


def test_missing_proxy_files(root: Path, tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(ConfigError, match="cifar-100-python/train") as err:
        check_data_config(config(tmp_path, "data.public.dataset=cifar100", "data.public.size=5"))
    assert err.value.field == "data.root"


def test_cache_key(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "copy"
    write_cifar10(copy)
    write_cifar100(copy)
    base = config(copy)
    key = data_key(base)
    assert data_key(config(copy)) == key
    assert data_key(config(root)) != key  # another root
    assert data_key(config(copy, "data.test=20")) != key
    assert data_key(config(copy, "data.public={dataset='cifar100', size=40}")) != data_key(
        config(copy, "data.public={dataset='cifar100', size=40, labels='coarse'}")
    )
    batch = copy / "cifar-10-batches-py" / "data_batch_3"
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_key(base) != key  # a file replaced or touched
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    first, path = prepare_federated_data(base)
    again, same = prepare_federated_data(base)
    assert same == path and path.name.startswith("cifar10-")
    np.testing.assert_array_equal(first.test_x, again.test_x)


# ----------------------------------------------------------------------------- unchanged


QUICKSTART_SHA256 = "cb15e7b0a16446586c3adb14ecbeacab26f93cf20359ee7250c844e95e9ee716"


def _digest(data: FederatedData) -> str:
    h = hashlib.sha256()
    arrays = (data.private_x, data.private_y, data.public_x, data.public_y, data.test_x)
    for a in (*arrays, data.test_y, *data.parts):
        h.update(a.tobytes())
        h.update(str(a.dtype).encode())
    return h.hexdigest()


def test_quickstart_arrays_and_key_unchanged() -> None:
    """The quick-start data (and its cache key) are what they were before official data."""
    cfg = load_config(None)
    assert _digest(build_federated_data(cfg)) == QUICKSTART_SHA256
    assert data_key(cfg) == "6da095e713bd56e2"
