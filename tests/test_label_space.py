"""A labelled proxy set with a label space of its own (FedMD's union of labels), the
``classes`` reader option (a subset of a dataset's classes), and FedMD's four paper
configs, on tiny files in the official formats.

FedMD (Li & Wang 2019; github.com/diogenes0319/FedMD_clean) gives every model
``len(public_classes) + len(private_classes)`` outputs: the public labels 0..P-1, the
private classes relabelled P..P+K-1; accuracy is the argmax over all of them on the
private test set.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.assignment import student_spec
from fedkd.baselines import baseline_config, run_centralised
from fedkd.config import Config, ConfigError, load_config, save_config
from fedkd.data import build_federated_data, prepare_federated_data
from fedkd.data.femnist import FEMNIST_CLASSES
from fedkd.data.prepare import check_data_config, data_key
from fedkd.data.readers import read_split, selection
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.models import build_model
from fedkd.runner import check_config
from tests.test_official_data import _dump, _images, write_cifar10, write_mnist
from tests.test_readers import write_idx

PAPERS = Path(__file__).resolve().parents[1] / "simulations" / "papers"
LETTERS = ["a", "b", "c", "d", "e", "f"]
PER_LETTER = {"train": 12, "test": 4}  # tiny EMNIST-letters: rows per letter and split
CIFAR100 = {"train": 6, "test": 2}  # tiny CIFAR-100: rows per fine class and split
WRITERS = 12  # tiny FEMNIST: writers, each with ROWS rows per split
ROWS = {"train": 14, "test": 4}


# ----------------------------------------------------------------------------- tiny files


def write_emnist_letters(root: Path) -> dict[str, np.ndarray]:
    """EMNIST/raw/emnist-letters-{train,test}-*: every letter PER_LETTER[split] times;
    labels as stored (1..26). Returns each split's labels as read (0..25)."""
    rng = np.random.default_rng(11)
    out = {}
    for split, per in PER_LETTER.items():
        n = 26 * per
        x = _images(rng, n, (28, 28), test=split == "test")
        y = (np.arange(n) % 26 + 1).astype(np.uint8)
        raw = root / "EMNIST" / "raw"
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte", x)
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte", y)
        out[split] = y.astype(np.int64) - 1
    return out


def write_cifar100_splits(root: Path) -> None:
    """cifar-100-python/{train,test,meta}: every fine class CIFAR100[split] times, the
    coarse label of fine class f being f // 5 (a stand-in for the real superclass map)."""
    rng = np.random.default_rng(12)
    folder = root / "cifar-100-python"
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    _dump(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    for split, per in CIFAR100.items():
        labels = np.arange(100 * per) % 100
        x = _images(rng, len(labels), (3, 32, 32), test=split == "test")
        batch = {b"data": x.reshape(len(x), -1), b"fine_labels": labels.tolist()}
        batch[b"coarse_labels"] = (labels // 5).tolist()
        _dump(folder / split, batch)


def femnist_label(writer: int, row: int) -> int:
    """LEAF labels: a-f (36-41), A-F (10-15) and digits, every writer having all three."""
    kind = row % 3
    pick = (writer + row) % 6
    return 36 + pick if kind == 0 else 10 + pick if kind == 1 else pick


def write_femnist(root: Path) -> None:
    """femnist/data/{train,test}/*.json in LEAF's format: WRITERS writers, one shard."""
    rng = np.random.default_rng(13)
    for split, n in ROWS.items():
        folder = root / "femnist" / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        users, counts, user_data = [], [], {}
        for w in range(WRITERS):
            ink = rng.integers(0, 200, size=(n, 784)) / 255
            name = f"f{w:04d}_{w:02d}"
            users.append(name)
            counts.append(n)
            labels = [femnist_label(w, r) for r in range(n)]
            user_data[name] = {"x": (1 - ink).tolist(), "y": labels}
        shard = {"users": users, "num_samples": counts, "user_data": user_data}
        (folder / f"all_data_0_niid_0_keep_0_{split}_9.json").write_text(json.dumps(shard))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset FedMD's settings read: MNIST, EMNIST-letters, FEMNIST, CIFAR-10/100."""
    folder = tmp_path_factory.mktemp("label_space")
    write_mnist(folder)  # 100 training and 20 test images, gzipped
    write_emnist_letters(folder)
    write_femnist(folder)
    write_cifar10(folder)  # 200 training and 50 test images
    write_cifar100_splits(folder)
    return folder


AF = "data.dataset={name='emnist', subset='letters', classes=['a','b','c','d','e','f']}"
OWN = "data.public={dataset='mnist', size=60, labelled=true, label_space='own'}"
PLAIN = "data.public={dataset='mnist', size=60}"  # the same rows, unlabelled


def config(root: Path, *overrides: str) -> Config:
    """EMNIST letters a-f (private, 72 training rows) with a proxy set of MNIST digits."""
    base = [AF, OWN, f"data.root={root}", "data.private=48", "data.test=0"]
    more = ["clients.count=4", "partition=iid", "data.normalize=false"]
    return load_config(None, [*base, *more, *overrides])


def rows(x: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(r).tobytes() for r in x]


# ----------------------------------------------------------------------------- union space


def test_the_union_label_space_shifts_the_private_labels(root: Path) -> None:
    data = build_federated_data(config(root))
    assert data.public_classes == 10 and data.num_classes == 16
    mnist = read_split("mnist", root, "train")
    digit = dict(zip(rows(mnist.x), mnist.y.tolist(), strict=True))
    assert data.public_y.tolist() == [digit[r] for r in rows(data.public_x)]  # own labels
    letters = read_split("emnist", root, "train", subset="letters")
    letter = dict(zip(rows(letters.x), letters.y.tolist(), strict=True))
    assert [letter[r] + 10 for r in rows(data.private_x)] == data.private_y.tolist()
    assert set(data.private_y.tolist()) <= set(range(10, 16))
    # the test set: every a-f test image of the test split, labels shifted the same way
    test = read_split("emnist", root, "test", subset="letters")
    af = test.y < 6
    assert rows(data.test_x) == rows(test.x[af]) and data.test_y.tolist() == (
        (test.y[af] + 10).tolist()
    )
    assert len(data.test_y) == 6 * PER_LETTER["test"]
    # one label space: the same private rows and parts, labels unshifted, P = 0
    shared = build_federated_data(config(root, PLAIN))
    assert shared.num_classes == 6 and shared.public_classes == 0
    assert (shared.public_y == -1).all() and rows(shared.public_x) == rows(data.public_x)
    assert rows(shared.private_x) == rows(data.private_x)
    assert (shared.private_y + 10).tolist() == data.private_y.tolist()


@pytest.mark.parametrize(
    "partition",
    [
        "partition={name='dirichlet', alpha=0.5, min_size=2}",
        "partition={name='pathological', classes_per_client=2}",
        "partition={name='shard', shards_per_client=2}",
        "partition=iid",
    ],
)
def test_partitioners_split_by_the_private_classes(root: Path, partition: str) -> None:
    """Partitioners see the private labels 0..K-1: the parts are those of one label space."""
    own = build_federated_data(config(root, partition))
    shared = build_federated_data(config(root, PLAIN, partition))
    assert all(np.array_equal(a, b) for a, b in zip(own.parts, shared.parts, strict=True))
    if "pathological" in partition:
        assert all(len(set(own.private_y[p].tolist())) <= 2 for p in own.parts)
    assert all(set(own.private_y[p].tolist()) <= set(range(10, 16)) for p in own.parts)


def test_writer_partition_and_merged_classes_in_the_union(root: Path) -> None:
    """FEMNIST letters a-f, case merged as EMNIST-letters is, one writer per client."""
    merged = "[['a','A'],['b','B'],['c','C'],['d','D'],['e','E'],['f','F']]"
    cfg = load_config(
        None,
        [f"data.dataset={{name='femnist', classes={merged}}}", OWN, f"data.root={root}"]
        + ["data.private=100", "data.test=0", "clients.count=4", "data.normalize=false"]
        + ["partition={name='writer', writers_per_client=1}"],
    )
    check_config(cfg)
    data = build_federated_data(cfg)
    assert data.num_classes == 16 and data.public_classes == 10
    assert data.private_groups is not None
    assert all(len(set(data.private_groups[p].tolist())) == 1 for p in data.parts)
    # every a-f / A-F training row of the split, merged by case
    split = read_split("femnist", root, "train", classes=json.loads(merged.replace("'", '"')))
    assert split.classes == ("a/A", "b/B", "c/C", "d/D", "e/E", "f/F")
    leaf = [femnist_label(w, r) for w in range(WRITERS) for r in range(ROWS["train"])]
    kept = [label for label in leaf if label >= 10]
    assert split.y.tolist() == [(label - 10) % 26 for label in kept]
    assert set(data.test_y.tolist()) == set(range(10, 16))


def test_fedmd_and_every_baseline_run_with_p_plus_k_outputs(root: Path) -> None:
    """A short FedMD run in-process (as Flower computes it), then local, transfer,
    FedAvg and centralised, and FD's per-class payloads, all with 16 outputs."""
    cfg = config(
        root,
        "clients.models=[{name='fedmd_cnn2', n1=4, n2=8}]",
        "strategy={name='fedmd', transfer_epochs=1, private_epochs=1}",
        "server.public_subset=20",
        "clients.local_epochs=1",
        "rounds=2",
        "privacy.audit=false",
    )
    check_config(cfg)
    data, path = prepare_federated_data(cfg)
    assert data.num_classes == 16
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert [r.round for r in records] == [1, 2] and records[-1].failures == ()
    assert records[-1].bytes_up > 0  # the logits on the public subset: 16 per sample
    for record in records:
        for client in record.clients.values():
            assert 0.0 <= client.accuracy <= 1.0
            assert 0.0 <= client.metrics["own_accuracy"] <= 1.0
    for name in ("local", "transfer", "fedavg"):
        base = baseline_config(cfg, name)
        done = Federation(base, data).run(InlineTransport(base, str(path)))
        assert len(done) == 2 and done[-1].failures == (), name
    assert len(run_centralised(cfg, data)) == 2
    fd = load_config(cfg, ["strategy=fd", "rounds=1"])
    fd_data, fd_path = prepare_federated_data(fd)
    (record,) = Federation(fd, fd_data).run(InlineTransport(fd, str(fd_path)))
    assert record.failures == () and record.bytes_up > 0


def test_the_label_space_round_trips_and_keys_the_cache(root: Path, tmp_path: Path) -> None:
    cfg = config(root)
    assert cfg.data.public.label_space == "own" and cfg.data.public.labelled
    assert cfg.to_dict()["data"]["public"]["label_space"] == "own"
    assert "label_space" not in config(root, PLAIN).to_dict()["data"]["public"]
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    shared = "data.public={dataset='mnist', size=60, labelled=false}"
    assert data_key(cfg) != data_key(config(root, shared))
    data, path = prepare_federated_data(cfg)
    again, same = prepare_federated_data(cfg)
    assert same == path and again.public_classes == 10 and again.num_classes == 16


# ----------------------------------------------------------------------------- class subsets


def test_a_class_subset_keeps_and_relabels_in_the_order_given(root: Path) -> None:
    wanted = [82, 0, 63]
    out = read_split("cifar100", root, "train", classes=wanted)
    full = read_split("cifar100", root, "train")
    keep = np.isin(full.y, wanted)
    assert out.classes == ("fine82", "fine0", "fine63") and out.num_classes == 3
    assert rows(out.x) == rows(full.x[keep])
    assert out.y.tolist() == [wanted.index(int(y)) for y in full.y[keep]]
    cfg = load_config(
        None,
        [f"data.dataset={{name='cifar100', classes={wanted}}}", f"data.root={root}"]
        + ["data.private=12", "data.public=3", "data.test=0", "clients.count=3"]
        + ["partition=iid", "data.normalize=false"],
    )
    data = build_federated_data(cfg)
    assert data.num_classes == 3 and data.public_classes == 0
    assert sorted(data.test_y.tolist()) == sorted([0, 1, 2] * CIFAR100["test"])
    assert (data.public_y >= 0).all()  # an int data.public: a labelled slice, same classes
    coarse = read_split("cifar100", root, "test", labels="coarse", classes=[0, 1, 2, 3, 4, 5])
    assert len(coarse.y) == 30 * CIFAR100["test"] and coarse.num_classes == 6


def test_class_names_and_merged_classes(root: Path) -> None:
    by_name = read_split("emnist", root, "test", subset="letters", classes=["f", "a"])
    by_index = read_split("emnist", root, "test", subset="letters", classes=[5, 0])
    assert by_name.classes == ("f", "a") and by_name.y.tolist() == by_index.y.tolist()
    assert sorted(by_name.y.tolist()) == [0] * 4 + [1] * 4
    merged = read_split("mnist", root, "test", classes=[["0", 1, 2], [3, 4]])
    full = read_split("mnist", root, "test")
    assert merged.classes == ("0/1/2", "3/4")
    assert merged.y.tolist() == [0 if y < 3 else 1 for y in full.y.tolist() if y < 5]
    assert read_split("femnist", root, "test", classes="lowercase").num_classes == 26
    assert FEMNIST_CLASSES[36] == "a"


def test_reading_the_same_files_keeps_disjoint_rows_or_is_refused(root: Path) -> None:
    """Private CIFAR-100 classes and a CIFAR-100 proxy set share files: only disjoint
    classes of one label space may be both."""
    private = ["data.dataset={name='cifar100', classes=[0, 1, 2]}", f"data.root={root}"]
    private += ["data.private=12", "data.test=0", "clients.count=3", "partition=iid"]
    other = "data.public={dataset='cifar100', classes=[3, 4], size=8, labelled=true, "
    cfg = load_config(None, [*private, other + "label_space='own'}"])
    data = build_federated_data(cfg)
    assert data.num_classes == 5 and set(data.public_y.tolist()) <= {0, 1}
    assert not set(rows(data.public_x)) & set(rows(data.private_x))
    assert selection("cifar100", classes=[3, 4]) != selection("cifar100", classes=[0, 1, 2])
    assert selection("cifar100", classes=list(range(100))) is None  # every row
    refused = [
        "data.public={dataset='cifar100', size=8}",  # every class: the private ones too
        "data.public={dataset='cifar100', classes=[2, 3], size=8}",  # class 2 in both
        "data.public={dataset='cifar100', labels='coarse', classes=[5, 6], size=8}",
    ]
    for public in refused:
        with pytest.raises(ConfigError, match="overlapping") as err:
            check_data_config(load_config(None, [*private, public]))
        assert err.value.field == "data.public", public


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (["data.dataset.classes=['a','a']"], "data.dataset.classes", "listed twice"),
        (["data.dataset.classes=[['a','b'],'b']"], "data.dataset.classes", "listed twice"),
        (["data.dataset.classes=['a','?']"], "data.dataset.classes", "'?' is not a class"),
        (["data.dataset.classes=[0, 26]"], "data.dataset.classes", "26 is not a label"),
        (["data.dataset.classes=['a']"], "data.dataset.classes", "at least 2"),
        (["data.dataset.classes=[]"], "data.dataset.classes", "non-empty list"),
        (["data.dataset.classes=[[], 'a']"], "data.dataset.classes", "empty list"),
        (["data.dataset.classes=[true, 'a']"], "data.dataset.classes", "label index or"),
        (["data.dataset.classes='vowels'"], "data.dataset.classes", "not a list"),
        (
            ["data.dataset={name='cifar100', classes=['apple', 'bee']}"],
            "data.dataset.classes",
            "only in its files",
        ),
        (
            ["data.dataset={name='cifar100', labels='coarse', classes=[0, 20]}"],
            "data.dataset.classes",
            "20 is not a label of CIFAR-100",
        ),
        (
            ["data.public={dataset='mnist', classes=[0, 10], labelled=true, label_space='own'}"],
            "data.public.classes",
            "10 is not a label of MNIST",
        ),
        (
            ["data.public={dataset='mnist', size=60, labelled=true}"],
            "data.public.labelled",
            'label_space = "own"',
        ),
        (
            [
                "data.public={dataset='emnist', subset='letters', size=10, labelled=true, "
                "classes=['a','b','c','d','e','f'], label_space='own'}"
            ],
            "data.public.label_space",
            'use label_space = "shared"',
        ),
    ],
)
def test_bad_values_name_the_field(
    root: Path, overrides: list[str], field: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        check_data_config(config(root, *overrides))
    assert err.value.field == field


@pytest.mark.parametrize(
    ("public", "message"),
    [
        ("{dataset='mnist', labelled=true, label_space='both'}", "must be one of 'shared', 'own'"),
        ("{dataset='mnist', label_space='own'}", "unlabelled"),
        ("{dataset='mnist', labelled=false, label_space='own'}", "set labelled = true"),
    ],
)
def test_a_label_space_needs_a_labelled_proxy_table(public: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [f"data.public={public}"])
    assert err.value.field == "data.public.label_space"


def test_classes_of_an_unlabelled_split_are_refused(root: Path) -> None:
    public = "data.public={dataset='stl10', split='unlabeled', classes=[0, 1], size=5}"
    with pytest.raises(ConfigError, match="no labels") as err:
        check_data_config(load_config(None, [public, f"data.root={root}"]))
    assert err.value.field == "data.public.classes"


# ----------------------------------------------------------------------------- paper configs

FEDMD = sorted(PAPERS.glob("fedmd_*.toml"))
SMALLER = {  # sizes the tiny files hold; everything else is the paper config's
    "fedmd_mnist_femnist": ["data.private=60"],
    "fedmd_mnist_femnist_writer": ["data.private=100"],
    "fedmd_cifar_iid": ["data.private=30"],
    "fedmd_cifar": ["data.private=150"],
}


@pytest.mark.parametrize("path", FEDMD, ids=[p.stem for p in FEDMD])
def test_fedmds_paper_configs_pass_the_checks_and_build_a_union(root: Path, path: Path) -> None:
    """Each paper config, on tiny official files: the config and data checks pass as
    written, and with sizes the files hold it builds 10 public + 6 private classes."""
    cfg = load_config(path, [f"data.root={root}"])
    assert cfg.data.public.label_space == "own" and cfg.strategy.name == "fedmd"
    check_config(cfg)
    small = [*SMALLER[path.stem], "data.public.size=50", "server.public_subset=20"]
    data = build_federated_data(load_config(cfg, small))
    assert data.public_classes == 10 and data.num_classes == 16
    assert set(data.public_y.tolist()) <= set(range(10))
    assert set(data.private_y.tolist()) <= set(range(10, 16))
    assert set(data.test_y.tolist()) == set(range(10, 16))  # the private classes' test images
    assert len(data.parts) == 10 and all(len(p) for p in data.parts)
    # every model of the run (its students: FedMD has no server model, so the run never
    # builds server.teacher)
    specs = [student_spec(cfg, cid) for cid in range(cfg.clients.count)]
    for spec in {str(s): s for s in specs}.values():
        model = build_model(spec, data.input_shape, data.num_classes, seed=0).eval()
        with torch.no_grad():
            assert model(torch.as_tensor(data.test_x[:2])).shape == (2, 16), spec


def test_a_run_without_a_server_model_never_builds_server_teacher() -> None:
    """The end-of-run model profile skips ``server.teacher`` for strategies without a
    server model, so FedMD on images with the default (1-D) teacher does not crash
    after its last round."""
    from types import SimpleNamespace

    from fedkd.run_steps import _profiles

    cfg = load_config(None, ["strategy.name=fedmd", "clients.models=['cnn2d']"])
    assert cfg.server.teacher.name == "cnn1d"  # the default, a model for 1-D inputs
    images = SimpleNamespace(input_shape=(1, 28, 28), num_classes=16)
    assert list(_profiles(cfg, images, uses_teacher=False)) == ["cnn2d"]
    with pytest.raises(Exception):  # noqa: B017 - the 1-D teacher does not fit 2-D images
        _profiles(cfg, images, uses_teacher=True)
