"""The downloader against a local HTTP server serving tiny files in the official layouts."""

from __future__ import annotations

import io
import re
import socket
import tarfile
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from scipy.io import savemat

from fedkd.config import ConfigError
from fedkd.data.download import RESOURCES, Resource, describe, download
from fedkd.data.readers import MANUAL_SOURCES, READERS, expected_files, read_split
from tests.http_server import Server, md5
from tests.test_readers import dump, images, write_idx, write_mnist, write_stl

# ----------------------------------------------------------------------------- server


def targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def folder_blobs(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` by ``prefix`` + its relative POSIX path."""
    return {
        prefix + p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


# ----------------------------------------------------------------------------- tables


def test_resources_cover_every_reader_and_split() -> None:
    assert set(RESOURCES) | set(MANUAL_SOURCES) == set(READERS)
    assert not set(RESOURCES) & set(MANUAL_SOURCES)
    for name, resources in RESOURCES.items():
        assert resources, name
        for res in resources:
            for url in res.urls:
                assert urlparse(url).scheme in ("http", "https") and urlparse(url).netloc, url
            assert re.fullmatch(r"[0-9a-f]{32}", res.md5), (name, res.md5)
        option_sets: list[dict] = [{}]
        if name == "emnist":
            option_sets = [{"subset": s} for s in ("byclass", "bymerge", "letters", "mnist")]
        if name == "cifar100":
            option_sets.append({"labels": "coarse"})
        for options in option_sets:
            for split in READERS[name].splits:
                for rel in expected_files(name, split, **options):
                    matches = [
                        r
                        for r in resources
                        if any(fnmatchcase(rel.as_posix(), p) for p in r.provides)
                    ]
                    assert len(matches) == 1, (name, split, rel)


def test_confirmed_checksums() -> None:
    """A few checksums as torchvision's source has them (a typo here breaks real downloads)."""
    by_name = {(k, r.name): r.md5 for k, rs in RESOURCES.items() for r in rs}
    assert by_name["mnist", "t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    assert by_name["svhn", "test_32x32.mat"] == "eb5a983be6a315427106f1b164d9cef3"
    assert by_name["cifar10", "cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert by_name["emnist", "gzip.zip"] == "58c8d27c78d21e728a6bc7b3cc06412e"


def test_describe() -> None:
    text = describe("mnist")
    assert text.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/ (")
    assert "t10k-labels-idx1-ubyte.gz" in text and "MNIST/raw" in text
    assert "cifar-10-python.tar.gz" in describe("CIFAR-10")
    assert "biometrics.nist.gov" in describe("emnist") and "EMNIST/raw" in describe("emnist")
    for name in READERS:
        assert "\n" not in describe(name) and "http" in describe(name)
    assert "preprocess.sh" in describe("femnist")  # LEAF's route: no archive to fetch
    with pytest.raises(ConfigError, match="no reader for 'imagenet'"):
        describe("imagenet")


# ----------------------------------------------------------------------------- downloads


def mnist_table(server: Server, tmp_path: Path) -> dict[str, tuple[Resource, ...]]:
    """MNIST's four gzipped idx files, served; the resources as RESOURCES has them."""
    write_mnist(tmp_path / "src", "MNIST", gz=True)
    table = []
    for res in RESOURCES["mnist"]:
        blob = (tmp_path / "src" / "MNIST" / "raw" / res.name).read_bytes()
        served = server.add(res.name, blob)
        table.append(Resource(served.urls, served.md5, res.provides, res.folder))
    return {"mnist": tuple(table)}


def test_mnist_only_needed_then_nothing(server: Server, tmp_path: Path) -> None:
    root, table = tmp_path / "data", mnist_table(server, tmp_path)
    got = download("mnist", root, ["test"], sources=table, progress=False)
    assert sorted(server.hits) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]
    assert sorted(p.name for p in got) == [h[1:] for h in sorted(server.hits)]
    assert read_split("mnist", root, "test").x.shape == (3, 1, 28, 28)
    download("mnist", root, ["train", "test"], sources=table, progress=False)
    assert len(server.hits) == 4
    assert read_split("mnist", root, "train").x.shape == (5, 1, 28, 28)
    assert download("mnist", root, ("train", "test"), sources=table, progress=False) == []
    assert len(server.hits) == 4 and not leftovers(root)


def test_mnist_plain_idx_counts_as_present(server: Server, tmp_path: Path) -> None:
    root, table = tmp_path / "data", mnist_table(server, tmp_path)
    write_mnist(root, "MNIST", gz=False)  # uncompressed, as torchvision leaves them
    assert download("mnist", root, ["train", "test"], sources=table, progress=False) == []
    assert server.hits == []


def test_cifar10_archive(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src" / "cifar-10-batches-py"
    names = [f"class{i}".encode() for i in range(10)]
    dump(src / "batches.meta", {b"label_names": names}, 2)
    train = images(5, (3, 32, 32))
    for i in range(5):
        batch = {b"data": train[i : i + 1].reshape(1, 3072), b"labels": [i]}
        dump(src / f"data_batch_{i + 1}", batch, 2)
    dump(src / "test_batch", {b"data": images(2, (3, 32, 32)).reshape(2, 3072), b"labels": [3, 4]})
    (src / "readme.html").write_text("<html></html>")
    served = server.add("cifar-10-python.tar.gz", targz(folder_blobs(src, "cifar-10-batches-py/")))
    (official,) = RESOURCES["cifar10"]
    table = {"cifar10": (Resource(served.urls, served.md5, official.provides),)}

    root = tmp_path / "data"
    got = download("cifar10", root, ["test"], sources=table, progress=False)
    assert len(got) == 8 and all(p.parent == root / "cifar-10-batches-py" for p in got)
    assert not (root / "cifar-10-python.tar.gz").exists() and not leftovers(root)
    out = read_split("cifar10", root, "train")
    np.testing.assert_array_equal(out.x, train / np.float32(255))
    assert out.classes[3] == "class3"
    np.testing.assert_array_equal(read_split("cifar10", root, "test").y, [3, 4])
    assert download("cifar10", root, ["train", "test"], sources=table, progress=False) == []
    assert server.hits == ["/cifar-10-python.tar.gz"]


def test_emnist_zip_lands_in_raw(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for subset in ("balanced", "letters"):
        for split, n in (("train", 4), ("test", 3)):
            stem = f"emnist-{subset}-{split}"
            write_idx(src / f"{stem}-images-idx3-ubyte", images(n, (28, 28)), gz=True)
            write_idx(
                src / f"{stem}-labels-idx1-ubyte", np.arange(1, n + 1, dtype=np.uint8), gz=True
            )
    (src / "emnist-balanced-mapping.txt").write_text("0 48\n")
    served = server.add("gzip.zip", zipped({"gzip/": b"", **folder_blobs(src, "gzip/")}))
    (official,) = RESOURCES["emnist"]
    resource = Resource(served.urls, served.md5, official.provides, official.folder, strip="gzip")

    root = tmp_path / "data"
    download(
        "emnist", root, ["test"], sources={"emnist": (resource,)}, progress=False, subset="letters"
    )
    raw = root / "EMNIST" / "raw"
    assert (raw / "emnist-letters-test-images-idx3-ubyte.gz").is_file()
    assert not (raw / "gzip").exists() and not (raw / "gzip.zip").exists()
    out = read_split("emnist", root, "test", subset="letters")
    np.testing.assert_array_equal(out.y, [0, 1, 2])
    assert read_split("emnist", root, "train").x.shape == (4, 1, 28, 28)  # balanced, same zip
    assert server.hits == ["/gzip.zip"]


def test_stl10_archive(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src" / "stl10_binary"
    write_stl(src, "train", images(2, (3, 96, 96)), np.array([1, 10]))
    write_stl(src, "test", images(2, (3, 96, 96)), np.array([2, 3]))
    write_stl(src, "unlabeled", images(1, (3, 96, 96)), None)
    served = server.add("stl10_binary.tar.gz", targz(folder_blobs(src, "stl10_binary/")))
    table = {"stl10": (Resource(served.urls, served.md5, RESOURCES["stl10"][0].provides),)}
    root = tmp_path / "data"
    download("stl10", root, ["train", "unlabeled"], sources=table, progress=False)
    np.testing.assert_array_equal(read_split("stl10", root, "train").y, [0, 9])
    assert read_split("stl10", root, "unlabeled").y is None


def test_svhn_fetches_only_the_split(server: Server, tmp_path: Path) -> None:
    table = []
    for res in RESOURCES["svhn"]:
        mat = tmp_path / res.name
        savemat(mat, {"X": images(3, (32, 32, 3)).transpose(1, 2, 3, 0), "y": [[1], [2], [10]]})
        served = server.add(res.name, mat.read_bytes())
        table.append(Resource(served.urls, served.md5, res.provides))
    root = tmp_path / "data"
    got = download("svhn", root, ["test"], sources={"svhn": tuple(table)}, progress=False)
    assert got == [root / "test_32x32.mat"] and server.hits == ["/test_32x32.mat"]
    np.testing.assert_array_equal(read_split("svhn", root, "test").y, [1, 2, 0])
    assert not (root / "train_32x32.mat").exists() and not (root / "extra_32x32.mat").exists()


def test_progress_bar(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    served = server.add("test_32x32.mat", b"x" * 5000)
    table = {"svhn": (Resource(served.urls, served.md5, ("test_32x32.mat",)),)}
    download("svhn", tmp_path / "data", ["test"], sources=table, progress=True)
    assert "test_32x32.mat" in capsys.readouterr().err


# ----------------------------------------------------------------------------- failures


def svhn_test(resource: Resource) -> dict[str, tuple[Resource, ...]]:
    return {"svhn": (Resource(resource.urls, resource.md5, ("test_32x32.mat",)),)}


def test_md5_mismatch(server: Server, tmp_path: Path) -> None:
    served = server.add("test_32x32.mat", b"tampered")
    table = svhn_test(Resource(served.urls, "0" * 32, ()))
    root = tmp_path / "data"
    with pytest.raises(ConfigError) as err:
        download("svhn", root, ["test"], sources=table, progress=False)
    message = str(err.value)
    assert err.value.field == "data.download" and "\n" not in message
    for part in ("SVHN", served.urls[0], str(root), "0" * 32, md5(b"tampered"), "md5 mismatch"):
        assert part in message
    assert not (root / "test_32x32.mat").exists() and not leftovers(root)


def test_http_404_names_the_url(server: Server, tmp_path: Path) -> None:
    table = svhn_test(Resource((server.url + "nowhere.mat",), "0" * 32, ()))
    with pytest.raises(ConfigError, match="404") as err:
        download("svhn", tmp_path / "data", ["test"], sources=table, progress=False)
    assert err.value.field == "data.download"
    assert server.url + "nowhere.mat" in str(err.value) and "SVHN" in str(err.value)
    assert not leftovers(tmp_path / "data")


def test_network_failure(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port with nothing listening once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/test_32x32.mat"
    with pytest.raises(ConfigError, match="network error") as err:
        download("svhn", tmp_path, ["test"], sources=svhn_test(Resource((url,), "0" * 32, ())))
    assert err.value.field == "data.download" and url in str(err.value)


def test_next_mirror_after_a_failure(server: Server, tmp_path: Path) -> None:
    served = server.add("test_32x32.mat", b"content")
    mirrors = Resource((server.url + "gone/test_32x32.mat", *served.urls), served.md5, ())
    download("svhn", tmp_path / "data", ["test"], sources=svhn_test(mirrors), progress=False)
    assert (tmp_path / "data" / "test_32x32.mat").read_bytes() == b"content"
    assert server.hits == ["/gone/test_32x32.mat", "/test_32x32.mat"]


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "cifar-10-batches-py/../../evil.txt", "/tmp/fedkd-evil.txt", "C:\\evil.txt"],
)
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_member_outside_is_refused(
    server: Server, tmp_path: Path, member: str, kind: str
) -> None:
    members = {"cifar-10-batches-py/test_batch": b"ok", member: b"evil"}
    name = "cifar-10-python.tar.gz" if kind == "tar" else "cifar-10-python.zip"
    served = server.add(name, targz(members) if kind == "tar" else zipped(members))
    table = {"cifar10": (Resource(served.urls, served.md5, ("cifar-10-batches-py/*",)),)}
    root = tmp_path / "data" / "root"
    with pytest.raises(ConfigError, match="refusing to extract .*outside") as err:
        download("cifar10", root, ["test"], sources=table, progress=False)
    assert err.value.field == "data.download" and member in str(err.value).replace("\\\\", "\\")
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/fedkd-evil.txt").exists()
    assert (root / name).is_file()  # kept


def test_tar_link_is_refused(server: Server, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    served = server.add("cifar-10-python.tar.gz", buf.getvalue())
    table = {"cifar10": (Resource(served.urls, served.md5, ("cifar-10-batches-py/*",)),)}
    with pytest.raises(ConfigError, match="link or special file"):
        download("cifar10", tmp_path / "data", ["test"], sources=table, progress=False)
    assert not (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").exists()


def test_failed_extraction_keeps_archive_for_reuse(server: Server, tmp_path: Path) -> None:
    good = targz({"stl10_binary/test_X.bin": b"\0" * 10, "stl10_binary/test_y.bin": b"\1"})
    served = server.add("stl10_binary.tar.gz", good[: len(good) // 2])  # truncated
    table = {"stl10": (Resource(served.urls, served.md5, ("stl10_binary/*",)),)}
    root = tmp_path / "data"
    with pytest.raises(ConfigError, match="could not extract the STL-10 archive") as err:
        download("stl10", root, ["test"], sources=table, progress=False)
    assert "is kept" in str(err.value) and (root / "stl10_binary.tar.gz").is_file()
    assert not leftovers(root)
    # a kept archive whose md5 matches is extracted without fetching it again
    (root / "stl10_binary.tar.gz").write_bytes(good)
    table = {"stl10": (Resource(served.urls, md5(good), ("stl10_binary/*",)),)}
    download("stl10", root, ["test"], sources=table, progress=False)
    assert (root / "stl10_binary" / "test_y.bin").read_bytes() == b"\1"
    assert server.hits == ["/stl10_binary.tar.gz"] and not (root / "stl10_binary.tar.gz").exists()


def test_archive_without_a_needed_file(server: Server, tmp_path: Path) -> None:
    served = server.add("stl10_binary.tar.gz", targz({"stl10_binary/test_X.bin": b"\0"}))
    table = {"stl10": (Resource(served.urls, served.md5, ("stl10_binary/*",)),)}
    with pytest.raises(ConfigError, match=r"stl10_binary/test_y\.bin is still missing"):
        download("stl10", tmp_path, ["test"], sources=table, progress=False)


def test_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no reader for 'imagenet'"):
        download("imagenet", tmp_path, ["train"])
    with pytest.raises(ConfigError, match="not one of train, test, extra") as err:
        download("svhn", tmp_path, ["validation"])
    assert err.value.field == "data.dataset.split"
    with pytest.raises(ConfigError, match="cannot download SVHN"):
        download("svhn", tmp_path, ["test"], sources={})
    with pytest.raises(ConfigError, match="no download source for SVHN file test_32x32.mat"):
        download("svhn", tmp_path, ["test"], sources={"svhn": ()})


def test_a_dataset_without_a_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot download FEMNIST.*preprocess.sh") as err:
        download("femnist", tmp_path, ["train"])
    assert err.value.field == "data.download"
