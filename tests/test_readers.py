"""Readers of the official on-disk formats, against tiny files written in those formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from fedkd.config import ConfigError
from fedkd.data.readers import (
    READERS,
    CorruptFileError,
    Split,
    expected_files,
    read_idx,
    read_split,
)

RNG = np.random.default_rng(0)


def images(n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random uint8 images below 255, so a single 255 marks a known pixel."""
    return RNG.integers(0, 255, size=(n, *shape), dtype=np.uint8)


def check_split(split: Split, n: int, shape: tuple[int, ...]) -> None:
    assert split.x.shape == (n, *shape)
    assert split.x.dtype == np.float32 and split.x.flags.c_contiguous
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    if split.y is not None:
        assert split.y.shape == (n,) and split.y.dtype == np.int64
        assert split.y.min() >= 0 and split.y.max() < split.num_classes


# ----------------------------------------------------------------------------- idx


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    """An idx file as on Yann LeCun's page: magic 0x0000080D, big-endian uint32 sizes, bytes."""
    magic = 0x0800 | arr.ndim if magic is None else magic
    blob = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)
    return path


def write_mnist(root: Path, folder: str, gz: bool, prefix: str = "") -> dict[str, tuple]:
    data = {}
    for split, stem, n in (("train", "train", 5), ("test", "t10k", 3)):
        x, y = images(n, (28, 28)), RNG.integers(0, 10, size=n, dtype=np.uint8)
        x[1, 3, 7] = 255  # row 3, column 7
        write_idx(root / folder / "raw" / f"{prefix}{stem}-images-idx3-ubyte", x, gz)
        write_idx(root / folder / "raw" / f"{prefix}{stem}-labels-idx1-ubyte", y, gz)
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize(
    ("name", "folder", "first_class"),
    [("mnist", "MNIST", "0"), ("fashion_mnist", "FashionMNIST", "T-shirt/top")],
)
def test_mnist_formats(tmp_path: Path, gz: bool, name: str, folder: str, first_class: str) -> None:
    data = write_mnist(tmp_path, folder, gz)
    for split, n in (("train", 5), ("test", 3)):
        raw_x, raw_y = data[split]
        out = read_split(name, tmp_path, split)
        check_split(out, n, (1, 28, 28))
        assert out.x[1, 0, 3, 7] == 1.0 and (out.x == 1.0).sum() == 1
        np.testing.assert_array_equal(out.x[:, 0], raw_x / np.float32(255))
        np.testing.assert_array_equal(out.y, raw_y)
        assert out.classes[0] == first_class and out.num_classes == 10
        assert out.source == tmp_path / folder / "raw"
        assert all(p.name.endswith(".gz") == gz for p in out.files)


def test_emnist_upright_and_letters(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    x = images(5, (28, 28))
    x[2, 4, 9] = 255  # stored transposed: upright row 9, column 4
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", x)
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.array([1, 26, 2, 13, 1], np.uint8))
    out = read_split("emnist", tmp_path, "train", subset="letters")
    check_split(out, 5, (1, 28, 28))
    assert out.x[2, 0, 9, 4] == 1.0 and (out.x == 1.0).sum() == 1
    np.testing.assert_array_equal(out.y, [0, 25, 1, 12, 0])
    assert out.classes == tuple("abcdefghijklmnopqrstuvwxyz")
    stored = read_split("emnist", tmp_path, "train", subset="letters", upright=False)
    assert stored.x[2, 0, 4, 9] == 1.0
    np.testing.assert_array_equal(stored.x[:, 0], x / np.float32(255))


@pytest.mark.parametrize(("subset", "count"), [("balanced", 47), ("byclass", 62), ("digits", 10)])
def test_emnist_subsets(tmp_path: Path, subset: str, count: int) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    write_idx(raw / f"emnist-{subset}-test-images-idx3-ubyte", images(3, (28, 28)), gz=True)
    labels = np.array([0, count - 1, 5], np.uint8)
    write_idx(raw / f"emnist-{subset}-test-labels-idx1-ubyte", labels, gz=True)
    out = read_split("EMNIST", tmp_path, "test", subset=subset)
    assert out.num_classes == count
    np.testing.assert_array_equal(out.y, labels)


def test_emnist_letters_label_zero_is_corrupt(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    write_idx(raw / "emnist-letters-test-images-idx3-ubyte", images(2, (28, 28)))
    write_idx(raw / "emnist-letters-test-labels-idx1-ubyte", np.array([0, 3], np.uint8))
    with pytest.raises(CorruptFileError, match=r"labels must lie in 1\.\.26"):
        read_split("emnist", tmp_path, "test", subset="letters")


def test_read_idx_any_header(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", arr)), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", arr, gz=True)), arr)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"\x08\x03" + b[2:], "bad idx magic number 0x08030803"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad idx magic number 0x00000703"),
        (lambda b: b[:-1], r"\(2352 data bytes\) but 2351 data bytes follow"),
        (lambda b: b + b"\0", "but 2353 data bytes follow"),
        (lambda b: b[:10], "header needs 16 bytes"),
        (lambda b: b"", "shorter than the idx magic"),
    ],
    ids=["magic-prefix", "magic-type", "truncated", "trailing", "short-header", "empty"],
)
def test_corrupt_idx(tmp_path: Path, damage, message: str) -> None:
    data = write_mnist(tmp_path, "MNIST", gz=False)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    blob = path.read_bytes()
    assert len(blob) == 16 + 3 * 784 and data["test"][0].shape == (3, 28, 28)
    path.write_bytes(damage(blob))
    with pytest.raises(CorruptFileError, match=message) as err:
        read_split("mnist", tmp_path, "test")
    assert err.value.field == "data.root" and err.value.path == path
    assert str(path) in str(err.value)


def test_idx_wrong_kind_and_count(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", gz=False)
    raw = tmp_path / "MNIST" / "raw"
    images_file, labels_file = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    blob = images_file.read_bytes()
    labels_file.write_bytes(blob)  # an images file where the labels belong
    with pytest.raises(CorruptFileError, match="0x00000801"):
        read_split("mnist", tmp_path, "test")
    write_idx(labels_file, np.zeros(4, np.uint8))
    with pytest.raises(CorruptFileError, match="4 labels for 3 images"):
        read_split("mnist", tmp_path, "test")


def test_bad_gzip(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(tmp_path, "MNIST", gz=True)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(CorruptFileError, match="cannot gunzip"):
        read_split("mnist", tmp_path, "train")


# ----------------------------------------------------------------------------- CIFAR


def dump(path: Path, obj: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    """Pickle with bytes keys as the CIFAR files have; protocol 2 names NumPy 1's module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:  # as in the official Python 2 files
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        if any(isinstance(v, np.ndarray) for v in obj.values()):
            assert b"numpy.core.multiarray\n_reconstruct" in blob
    path.write_bytes(blob)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 1}, protocol)
    train = images(5, (3, 32, 32))
    train[3, 1, 2, 5] = 255  # green plane, row 2, column 5
    for i in range(5):
        batch = {b"batch_label": b"b", b"data": train[i : i + 1].reshape(1, 3072)}
        dump(folder / f"data_batch_{i + 1}", {**batch, b"labels": [i + 5]}, protocol)
    test = images(3, (3, 32, 32))
    dump(folder / "test_batch", {b"data": test.reshape(3, 3072), b"labels": [9, 0, 1]}, protocol)

    out = read_split("cifar10", tmp_path, "train")
    check_split(out, 5, (3, 32, 32))
    assert out.x[3, 1, 2, 5] == 1.0 and (out.x == 1.0).sum() == 1
    np.testing.assert_array_equal(out.x, train / np.float32(255))
    np.testing.assert_array_equal(out.y, [5, 6, 7, 8, 9])
    assert out.classes[1] == "automobile" and out.num_classes == 10
    assert len(out.files) == 6 and out.source == folder
    te = read_split("CIFAR-10", tmp_path, "test")
    np.testing.assert_array_equal(te.x, test / np.float32(255))
    np.testing.assert_array_equal(te.y, [9, 0, 1])


def write_cifar100(tmp_path: Path) -> np.ndarray:
    folder = tmp_path / "cifar-100-python"
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    dump(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse}, 2)
    x = images(5, (3, 32, 32))
    x[0, 2, 31, 0] = 255
    labels = {b"fine_labels": [0, 99, 3, 4, 5], b"coarse_labels": [19, 0, 1, 2, 3]}
    dump(folder / "train", {b"data": x.reshape(5, 3072), **labels}, 2)
    return x


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    x = write_cifar100(tmp_path)
    fine = read_split("cifar100", tmp_path, "train")
    check_split(fine, 5, (3, 32, 32))
    assert fine.x[0, 2, 31, 0] == 1.0 and (fine.x == 1.0).sum() == 1
    np.testing.assert_array_equal(fine.x, x / np.float32(255))
    np.testing.assert_array_equal(fine.y, [0, 99, 3, 4, 5])
    assert fine.num_classes == 100 and fine.classes[99] == "fine99"
    coarse = read_split("cifar_100", tmp_path, "train", labels="coarse")
    np.testing.assert_array_equal(coarse.y, [19, 0, 1, 2, 3])
    assert coarse.num_classes == 20 and coarse.classes[0] == "coarse0"
    with pytest.raises(ConfigError, match="'medium' is not one of fine, coarse"):
        read_split("cifar100", tmp_path, "train", labels="medium")


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_pickle_runs_no_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar100(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"x": Boom()}))
    with pytest.raises(CorruptFileError, match="refusing to load global .*system"):
        read_split("cifar100", tmp_path, "train")
    assert not (tmp_path / "pwned.txt").exists()


def test_cifar_malformed_batches(tmp_path: Path) -> None:
    x = write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    dump(train, {b"data": x.reshape(5, 3072), b"coarse_labels": [0] * 5})
    with pytest.raises(CorruptFileError, match="no 'fine_labels' entry"):
        read_split("cifar100", tmp_path, "train")
    dump(train, {b"data": x.reshape(5, 32, 96), b"fine_labels": [0] * 5})
    with pytest.raises(CorruptFileError, match=r"shape \(N, 3072\)"):
        read_split("cifar100", tmp_path, "train")
    dump(train, {b"data": x.reshape(5, 3072), b"fine_labels": [0, 1, 2, 3, 100]})
    with pytest.raises(CorruptFileError, match=r"labels must lie in 0\.\.99"):
        read_split("cifar100", tmp_path, "train")
    train.write_bytes(b"not a pickle")
    with pytest.raises(CorruptFileError, match="cannot unpickle"):
        read_split("cifar100", tmp_path, "train")


# ----------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("split", ["train", "extra"])
def test_svhn(tmp_path: Path, split: str) -> None:
    x = images(5, (3, 32, 32))  # (N, C, H, W)
    x[4, 0, 1, 30] = 255
    y = np.array([[10], [1], [9], [10], [5]], np.uint8)  # (N, 1), 10 is the digit 0
    savemat(tmp_path / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y})
    out = read_split("svhn", tmp_path, split)
    check_split(out, 5, (3, 32, 32))
    assert out.x[4, 0, 1, 30] == 1.0 and (out.x == 1.0).sum() == 1
    np.testing.assert_array_equal(out.x, x / np.float32(255))
    np.testing.assert_array_equal(out.y, [0, 1, 9, 0, 5])
    assert out.classes == tuple("0123456789")


def test_svhn_malformed(tmp_path: Path) -> None:
    path = tmp_path / "test_32x32.mat"
    savemat(path, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.array([[1], [0], [2]])})
    with pytest.raises(CorruptFileError, match=r"labels must lie in 1\.\.10"):
        read_split("svhn", tmp_path, "test")
    savemat(path, {"X": np.zeros((3, 32, 32, 3), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(CorruptFileError, match=r"'X' must be \(32, 32, 3, N\)"):
        read_split("svhn", tmp_path, "test")
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="cannot read it as a MATLAB file"):
        read_split("svhn", tmp_path, "test")


# ----------------------------------------------------------------------------- STL-10


def write_stl(folder: Path, split: str, x: np.ndarray, y: np.ndarray | None) -> None:
    """Images as in the STL-10 binaries: per channel, column-major (W before H)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
    if y is not None:
        y.astype(np.uint8).tofile(folder / f"{split}_y.bin")


def test_stl10(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    x = images(5, (3, 96, 96))
    x[2, 1, 10, 80] = 255  # channel 1, row 10, column 80
    write_stl(folder, "train", x, np.array([1, 10, 2, 3, 10]))
    write_stl(folder, "test", images(3, (3, 96, 96)), np.array([4, 5, 6]))
    out = read_split("stl10", tmp_path, "train")
    check_split(out, 5, (3, 96, 96))
    assert out.x[2, 1, 10, 80] == 1.0 and (out.x == 1.0).sum() == 1
    np.testing.assert_array_equal(out.x, x / np.float32(255))
    np.testing.assert_array_equal(out.y, [0, 9, 1, 2, 9])
    assert out.classes[7] == "monkey"
    np.testing.assert_array_equal(read_split("stl10", tmp_path, "test").y, [3, 4, 5])
    names = [f"class{i}" for i in range(10)]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    assert read_split("stl10", tmp_path, "test").classes == tuple(names)


def test_stl10_unlabeled(tmp_path: Path) -> None:
    x = images(3, (3, 96, 96))
    write_stl(tmp_path / "stl10_binary", "unlabeled", x, None)
    out = read_split("stl10", tmp_path, "unlabeled")
    check_split(out, 3, (3, 96, 96))
    assert out.y is None and out.num_classes == 10
    np.testing.assert_array_equal(out.x, x / np.float32(255))


def test_stl10_malformed(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    write_stl(folder, "test", images(3, (3, 96, 96)), np.array([1, 2]))
    with pytest.raises(CorruptFileError, match="2 labels for 3 images"):
        read_split("stl10", tmp_path, "test")
    write_stl(folder, "test", images(3, (3, 96, 96)), np.array([1, 2, 11]))
    with pytest.raises(CorruptFileError, match=r"labels must lie in 1\.\.10"):
        read_split("stl10", tmp_path, "test")
    (folder / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(CorruptFileError, match="not a multiple of 3\\*96\\*96"):
        read_split("stl10", tmp_path, "test")


# ----------------------------------------------------------------------------- lookup


EXPECTED = {
    ("mnist", "train"): ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"],
    ("fashion_mnist", "test"): [
        "FashionMNIST/raw/t10k-images-idx3-ubyte",
        "FashionMNIST/raw/t10k-labels-idx1-ubyte",
    ],
    ("emnist", "test"): [
        "EMNIST/raw/emnist-balanced-test-images-idx3-ubyte",
        "EMNIST/raw/emnist-balanced-test-labels-idx1-ubyte",
    ],
    ("cifar10", "train"): [
        *(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        "cifar-10-batches-py/batches.meta",
    ],
    ("cifar10", "test"): ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
    ("cifar100", "test"): ["cifar-100-python/test", "cifar-100-python/meta"],
    ("svhn", "extra"): ["extra_32x32.mat"],
    ("stl10", "train"): ["stl10_binary/train_X.bin", "stl10_binary/train_y.bin"],
    ("stl10", "unlabeled"): ["stl10_binary/unlabeled_X.bin"],
    ("femnist", "train"): ["femnist/data/train"],
    ("femnist", "test"): ["femnist/data/test"],
}


@pytest.mark.parametrize(("name", "split"), list(EXPECTED))
def test_expected_files(name: str, split: str) -> None:
    assert expected_files(name, split) == [Path(p) for p in EXPECTED[name, split]]


def test_expected_files_options() -> None:
    assert expected_files("emnist", "train", subset="letters")[0].name == (
        "emnist-letters-train-images-idx3-ubyte"
    )
    assert set(READERS) == {n for n, _ in EXPECTED}


@pytest.mark.parametrize(("name", "split"), list(EXPECTED))
def test_missing_files_name_everything(tmp_path: Path, name: str, split: str) -> None:
    with pytest.raises(ConfigError) as err:
        read_split(name, tmp_path, split)
    message = str(err.value)
    assert err.value.field == "data.root" and "\n" not in message
    assert str(tmp_path) in message
    assert ("data.download = true" in message) == (name != "femnist")  # LEAF makes FEMNIST
    assert READERS[name].title in message
    for rel in EXPECTED[name, split]:
        assert str(Path(rel)) in message


def test_missing_names_only_the_missing_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", gz=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"and MNIST/raw/t10k-labels-idx1-ubyte is missing"):
        read_split("mnist", tmp_path, "test")
    read_split("mnist", tmp_path, "train")  # the other split is complete


@pytest.mark.parametrize(
    ("args", "field", "message"),
    [
        (("imagenet", "train"), "data.dataset", "no reader for 'imagenet'"),
        (("svhn", "validation"), "data.dataset.split", "not one of train, test, extra"),
        (("mnist", "train", {"subset": "letters"}), "data.dataset", "takes no option"),
        (("emnist", "train", {"subset": "lower"}), "data.dataset.subset", "'lower' is not one"),
    ],
)
def test_bad_requests(tmp_path: Path, args: tuple, field: str, message: str) -> None:
    name, split, *options = args
    with pytest.raises(ConfigError, match=message) as err:
        read_split(name, tmp_path, split, **(options[0] if options else {}))
    assert err.value.field == field
