"""Readers of the official on-disk formats of common image-classification datasets.

Files are looked up in torchvision's standard layout under a root folder, so a folder
that torchvision already downloaded works as is (FEMNIST: in LEAF's layout, see
:mod:`fedkd.data.femnist`); nothing here downloads. Every reader returns one official
split as a :class:`Split`: ``x`` float32 in [0, 1] shaped (N, C, H, W), ``y`` int64
class indices from 0 (no normalisation) and, for FEMNIST, ``groups``: each row's writer.

==================  =============================================  ======================
name                files under the root                           splits
==================  =============================================  ======================
``mnist``           ``MNIST/raw/{train,t10k}-*-idx?-ubyte[.gz]``   train, test
``fashion_mnist``   ``FashionMNIST/raw/...`` (same names)          train, test
``emnist``          ``EMNIST/raw/emnist-<subset>-{train,test}-*``  train, test
``femnist``         ``femnist/data/{train,test}/*.json`` (LEAF)    train, test
``cifar10``         ``cifar-10-batches-py/``                       train, test
``cifar100``        ``cifar-100-python/``                          train, test
``svhn``            ``{train,test,extra}_32x32.mat``               train, test, extra
``stl10``           ``stl10_binary/``                              train, test, unlabeled
==================  =============================================  ======================

Full-size splits are large in float32 (STL-10 ``unlabeled``: 100,000 x 27,648 values,
about 11 GB); each reader holds the uint8 file data and the float32 copy at its peak.

Every reader also takes ``classes``: a list of classes to keep, relabelled ``0..K-1`` in
the order given (label indices, class names where the reader knows them, or lists of
them merged into one class; see :mod:`fedkd.data.classes`); rows of other classes are
dropped. Use :func:`read_split` to read and :func:`expected_files` to list what a
split needs (for FEMNIST, the split's folder: every ``*.json`` shard in it is read).
A missing file raises :class:`~fedkd.config.ConfigError` on ``data.root``; a file that
is present but malformed raises :class:`CorruptFileError` (a ConfigError on the same
field) naming the file and the fault.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import string
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import ConfigError, json_key
from fedkd.data import femnist
from fedkd.data.classes import Groups, lookup, parse_classes

__all__ = [
    "READERS",
    "CorruptFileError",
    "Selection",
    "Split",
    "expected_files",
    "read_idx",
    "present_files",
    "read_split",
    "selection",
]

FIELD = "data.root"


class CorruptFileError(ConfigError):
    """A data file exists but does not hold what its official format says."""

    def __init__(self, path: Path, problem: str, remedy: str = "") -> None:
        self.path = Path(path)
        remedy = remedy or "delete it and download it again (data.download = true)"
        super().__init__(
            FIELD, f"{path} is corrupt or not in the expected format: {problem}; {remedy}"
        )


#: where to get the files of official datasets that fedkd cannot download itself
#: (the others: :data:`fedkd.data.download.RESOURCES`)
MANUAL_SOURCES: dict[str, str] = {"femnist": femnist.SOURCE}


def where_to_get(key: str) -> str:
    """How to get dataset ``key``'s files: ``data.download = true`` and its URLs, or the
    manual route for datasets fedkd cannot download."""
    if key in MANUAL_SOURCES:
        return f"fedkd cannot download them: get them from {MANUAL_SOURCES[key]}"
    from fedkd.data.download import describe  # (download imports this module)

    return f"set data.download = true to fetch them, or get them from {describe(key)}"


@dataclass(frozen=True)
class Split:
    """One official split: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,) or None.

    ``y`` is None only for splits without labels (STL-10's ``unlabeled``).
    ``classes[k]`` names class k; ``source`` is the folder the ``files`` were read from.
    ``groups`` is each row's writer id (str) for datasets that have writers (FEMNIST),
    else None.
    """

    x: np.ndarray
    y: np.ndarray | None
    classes: tuple[str, ...]
    source: Path
    files: tuple[Path, ...]
    groups: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- helpers


def _to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> contiguous float32 in [0, 1], without a float64 intermediate."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    x /= np.float32(255.0)
    return x


def _labels(raw: np.ndarray, path: Path, low: int, count: int) -> np.ndarray:
    """Shift labels stored as ``low..low+count-1`` to ``0..count-1``, checking the range."""
    y = np.asarray(raw, dtype=np.int64).reshape(-1) - low
    if y.size and (y.min() < 0 or y.max() >= count):
        raise CorruptFileError(
            path,
            f"labels must lie in {low}..{low + count - 1}, found {y.min() + low}..{y.max() + low}",
        )
    return y


def _same_length(x: np.ndarray, y: np.ndarray, x_path: Path, y_path: Path) -> None:
    if len(x) != len(y):
        raise CorruptFileError(y_path, f"{len(y)} labels for {len(x)} images in {x_path.name}")


# ----------------------------------------------------------------------------- idx


_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file, gzipped (``.gz``) or not, checking its header against its size.

    Format (Yann LeCun's MNIST page, http://yann.lecun.com/exdb/mnist/): a big-endian
    magic number ``0x0000TTDD`` (TT the element type, 0x08 = unsigned byte; DD the number
    of dimensions), then DD big-endian uint32 sizes, then the data in C order.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptFileError(path, f"cannot gunzip it ({err})") from None
    if len(raw) < 4:
        raise CorruptFileError(path, f"{len(raw)} bytes, shorter than the idx magic number")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or type_code not in _IDX_TYPES or ndim == 0:
        raise CorruptFileError(path, f"bad idx magic number 0x{magic:08X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(path, f"idx header needs {header} bytes, file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_TYPES[type_code]
    want = math.prod(shape) * dtype.itemsize
    if len(raw) - header != want:
        raise CorruptFileError(
            path,
            f"idx header says shape {shape} ({want} data bytes) "
            f"but {len(raw) - header} data bytes follow",
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_array(path: Path, magic: int) -> np.ndarray:
    """``read_idx`` that insists on unsigned bytes and the dimensions of ``magic``."""
    arr = read_idx(path)
    if arr.dtype != np.uint8 or arr.ndim != magic & 0xFF:
        raise CorruptFileError(
            path,
            f"expected idx magic number 0x{magic:08X} (unsigned bytes, {magic & 0xFF} "
            f"dimensions), got {arr.dtype} with {arr.ndim} dimensions",
        )
    return arr


_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_DIGITS = tuple(string.digits)
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# As torchvision's EMNIST.classes_split_dict, with letters' unused "N/A" class 0 dropped.
_EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "byclass": tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase),
    "bymerge": tuple(string.digits + string.ascii_uppercase + "abdefghnqrt"),
    "balanced": tuple(string.digits + string.ascii_uppercase + "abdefghnqrt"),
    "letters": tuple(string.ascii_lowercase),
    "digits": tuple(string.digits),
    "mnist": tuple(string.digits),
}


def _mnist_files(folder: str, split: str) -> list[Path]:
    prefix = _MNIST_PREFIX[split]
    return [
        Path(folder, "raw", f"{prefix}-images-idx3-ubyte"),
        Path(folder, "raw", f"{prefix}-labels-idx1-ubyte"),
    ]


def _emnist_files(split: str, subset: str = "balanced", upright: bool = True) -> list[Path]:
    _check_choice("subset", subset, _EMNIST_CLASSES)
    return [
        Path("EMNIST", "raw", f"emnist-{subset}-{split}-images-idx3-ubyte"),
        Path("EMNIST", "raw", f"emnist-{subset}-{split}-labels-idx1-ubyte"),
    ]


def _read_idx_pair(
    files: list[Path], classes: tuple[str, ...], low: int = 0, transpose: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _idx_array(files[0], _IDX_IMAGES), _idx_array(files[1], _IDX_LABELS)
    _same_length(images, labels, files[0], files[1])
    if transpose:
        images = images.transpose(0, 2, 1)
    return _to_unit(images[:, None]), _labels(labels, files[1], low, len(classes))


def _read_mnist(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    return (*_read_idx_pair(files, _DIGITS), _DIGITS)


def _read_fashion(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    return (*_read_idx_pair(files, _FASHION_CLASSES), _FASHION_CLASSES)


def _read_emnist(
    files: list[Path], split: str, subset: str = "balanced", upright: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """EMNIST (Cohen et al. 2017, https://www.nist.gov/itl/products-and-services/emnist-dataset).

    The idx files store every image transposed (column by column) relative to MNIST;
    torchvision returns them as stored. With ``upright=True`` (default) each image is
    transposed back so characters read like MNIST digits; ``upright=False`` keeps the
    stored orientation. ``letters`` labels 1..26 become 0..25 (a..z, case merged).
    """
    classes = _EMNIST_CLASSES[subset]
    low = 1 if subset == "letters" else 0
    return (*_read_idx_pair(files, classes, low, transpose=upright), classes)


# ----------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: no arbitrary code from a data file."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # Python 2 / NumPy 1 pickles (CIFAR's)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR python pickle as a dict with str keys (the files have bytes keys)."""
    try:
        # latin1: the files come from Python 2; NumPy needs it to rebuild arrays from them.
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CorruptFileError(path, f"cannot unpickle it ({err})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(path, f"expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _entry(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise CorruptFileError(path, f"no {key!r} entry (has {sorted(map(str, batch))})")
    return batch[key]


def _names(batch: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    return tuple(
        n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _entry(batch, key, path)
    )


def _cifar_images(batch: dict[str, Any], path: Path, label_key: str) -> tuple[Any, Any]:
    data = np.asarray(_entry(batch, "data", path))
    labels = np.asarray(_entry(batch, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptFileError(
            path, f"'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise CorruptFileError(path, f"{labels.size} labels for {len(data)} images")
    return data, labels


def _read_cifar(
    files: list[Path], classes: tuple[str, ...], label_key: str
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Batches of rows: 1024 red, 1024 green, 1024 blue bytes, each plane row-major 32x32.

    Format: https://www.cs.toronto.edu/~kriz/cifar.html ("Dataset layout").
    """
    images, labels = [], []
    for path in files:
        data, raw = _cifar_images(_unpickle(path), path, label_key)
        images.append(data)
        labels.append(_labels(raw, path, 0, len(classes)))
    data, y = np.concatenate(images), np.concatenate(labels)
    return _to_unit(data.reshape(-1, 3, 32, 32)), y, classes


#: CIFAR-10's class names (as in ``batches.meta``), for the ``classes`` option
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _cifar10_files(split: str) -> list[Path]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [Path("cifar-10-batches-py", n) for n in [*names, "batches.meta"]]


def _read_cifar10(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    *batches, meta = files
    classes = _names(_unpickle(meta), "label_names", meta)
    return _read_cifar(batches, classes, "labels")


def _cifar100_files(split: str, labels: str = "fine") -> list[Path]:
    _check_choice("labels", labels, ("fine", "coarse"))
    return [Path("cifar-100-python", split), Path("cifar-100-python", "meta")]


def _read_cifar100(
    files: list[Path], split: str, labels: str = "fine"
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """CIFAR-100: ``labels="fine"`` (100 classes, default) or ``"coarse"`` (20 superclasses)."""
    batch, meta = files
    classes = _names(_unpickle(meta), f"{labels}_label_names", meta)
    return _read_cifar([batch], classes, f"{labels}_labels")


# ----------------------------------------------------------------------------- SVHN


def _read_svhn(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """SVHN format 2 (http://ufldl.stanford.edu/housenumbers/): a MATLAB file holding
    ``X`` uint8 (32, 32, 3, N) as (height, width, channel, sample) and ``y`` (N, 1) in
    1..10, where 10 stands for the digit 0 (mapped to 0, as torchvision does).
    """
    from scipy.io import loadmat

    (path,) = files
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as err:  # scipy raises several types for a bad file
        raise CorruptFileError(path, f"cannot read it as a MATLAB file ({err})") from None
    for key in ("X", "y"):
        if key not in mat:
            raise CorruptFileError(path, f"no {key!r} variable")
    images = np.asarray(mat["X"])
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise CorruptFileError(path, f"'X' must be (32, 32, 3, N), got {images.shape}")
    raw = np.asarray(mat["y"]).reshape(-1)
    if raw.size != images.shape[3]:
        raise CorruptFileError(path, f"{raw.size} labels for {images.shape[3]} images")
    y = (_labels(raw, path, 1, 10) + 1) % 10  # checks 1..10; then digit d -> d, 10 -> 0
    return _to_unit(images.transpose(3, 2, 0, 1)), y, _DIGITS


# ----------------------------------------------------------------------------- STL-10

_STL_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
_STL_SIZE = 3 * 96 * 96


def _stl10_files(split: str) -> list[Path]:
    files = [Path("stl10_binary", f"{split}_X.bin")]
    if split != "unlabeled":
        files.append(Path("stl10_binary", f"{split}_y.bin"))
    return files


def _read_stl10(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """STL-10 binaries (https://cs.stanford.edu/~acoates/stl10/): ``*_X.bin`` holds uint8
    images of 3x96x96, each channel stored column-major (transposed here, as torchvision
    does, to (C, H, W)); ``*_y.bin`` one uint8 label 1..10 per image (mapped to 0..9).
    ``unlabeled`` has no labels file: its ``y`` is None. Class names come from
    ``stl10_binary/class_names.txt`` when present.
    """
    x_path = files[0]
    raw = np.fromfile(x_path, dtype=np.uint8)
    if raw.size % _STL_SIZE:
        raise CorruptFileError(x_path, f"{raw.size} bytes is not a multiple of 3*96*96")
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    classes = _STL_CLASSES
    names_file = x_path.parent / "class_names.txt"
    if names_file.is_file():
        classes = tuple(n.strip() for n in names_file.read_text().splitlines() if n.strip())
        if len(classes) != len(_STL_CLASSES):
            raise CorruptFileError(names_file, f"{len(classes)} class names, expected 10")
    y = None
    if len(files) > 1:
        y = _labels(np.fromfile(files[1], dtype=np.uint8), files[1], 1, len(classes))
        _same_length(images, y, x_path, files[1])
    return _to_unit(images), y, classes


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Reader:
    title: str
    splits: tuple[str, ...]
    files: Callable[..., list[Path]]  # (split, **options) -> relative paths
    # (files, split, **options) -> (x, y, classes), or (x, y, classes, groups) with `groups`
    read: Callable[..., tuple[Any, ...]]
    gzip_ok: bool = False
    # `files` names folders: every file matching this glob in them is read, sorted by name
    pattern: str | None = None
    groups: bool = False  # rows carry a writer id (Split.groups)
    # (**options) -> the class names, where known without reading files, else the class
    # count (for the ``classes`` option); the default: the ten digits (MNIST, SVHN)
    names: Callable[..., tuple[str, ...] | int] = lambda **_: _DIGITS
    # readers that apply the ``classes`` option themselves while reading (FEMNIST drops
    # rows as it parses its shards): (**options) -> the labels of each class kept; for
    # the others fedkd filters and relabels the split they return
    classes: Callable[..., Groups] | None = None
    layout: str = "torchvision's layout"


READERS: dict[str, _Reader] = {
    "mnist": _Reader(
        "MNIST", ("train", "test"), lambda s: _mnist_files("MNIST", s), _read_mnist, True
    ),
    "fashion_mnist": _Reader(
        "Fashion-MNIST",
        ("train", "test"),
        lambda s: _mnist_files("FashionMNIST", s),
        _read_fashion,
        True,
        names=lambda: _FASHION_CLASSES,
    ),
    "emnist": _Reader(
        "EMNIST",
        ("train", "test"),
        _emnist_files,
        _read_emnist,
        True,
        names=lambda subset="balanced", upright=True: _EMNIST_CLASSES[subset],
    ),
    "femnist": _Reader(
        "FEMNIST",
        ("train", "test"),
        femnist.femnist_files,
        femnist.read_femnist,
        pattern=femnist.PATTERN,
        groups=True,
        names=lambda classes="all", invert=True: femnist.FEMNIST_CLASSES,
        classes=lambda classes="all", invert=True: femnist.femnist_classes(classes),
        layout="LEAF's layout",
    ),
    "cifar10": _Reader(
        "CIFAR-10",
        ("train", "test"),
        _cifar10_files,
        _read_cifar10,
        names=lambda: _CIFAR10_CLASSES,
    ),
    "cifar100": _Reader(
        "CIFAR-100",
        ("train", "test"),
        _cifar100_files,
        _read_cifar100,
        names=lambda labels="fine": 20 if labels == "coarse" else 100,
    ),
    "svhn": _Reader(
        "SVHN", ("train", "test", "extra"), lambda s: [Path(f"{s}_32x32.mat")], _read_svhn
    ),
    "stl10": _Reader(
        "STL-10",
        ("train", "test", "unlabeled"),
        _stl10_files,
        _read_stl10,
        names=lambda: _STL_CLASSES,
    ),
}
"""Readers by canonical name; :func:`read_split` also accepts ``-`` or no separator."""


def _check_choice(option: str, value: Any, valid: Any) -> None:
    if value not in valid:
        raise ConfigError(f"data.dataset.{option}", f"{value!r} is not one of {', '.join(valid)}")


def _reader(name: str, split: str, options: dict[str, Any]) -> tuple[str, _Reader]:
    key = name.lower().replace("-", "").replace("_", "")
    canonical = {k.replace("_", ""): k for k in READERS}
    if key not in canonical:
        raise ConfigError("data.dataset", f"no reader for {name!r}; known: {', '.join(READERS)}")
    reader = READERS[canonical[key]]
    _check_choice("split", split, reader.splits)
    try:  # unknown options fail here, before any file is touched
        reader.files(split, **_own(reader, options))
    except TypeError:
        raise ConfigError(
            "data.dataset", f"{reader.title} takes no option among {sorted(options)}"
        ) from None
    if "classes" in options:
        if split == "unlabeled":
            raise ConfigError(
                "data.dataset.classes", f"{reader.title} {split} has no labels to keep classes by"
            )
        _groups(reader, options)  # an unknown class fails here too
    return canonical[key], reader


def _own(reader: _Reader, options: dict[str, Any]) -> dict[str, Any]:
    """The options the reader's own functions take (``classes`` is fedkd's, unless the
    reader applies it itself)."""
    if reader.classes is not None:
        return options
    return {k: v for k, v in options.items() if k != "classes"}


def _groups(reader: _Reader, options: dict[str, Any]) -> Groups | None:
    """The labels of each class that ``options`` keep, checked; None: every class, as read."""
    if reader.classes is not None:
        return reader.classes(**options)
    if "classes" not in options:
        return None
    own = _own(reader, options)
    shown = {k: v for k, v in own.items() if k not in _LOOKS}
    title = reader.title + (f" ({json_key(shown)})" if shown else "")
    return parse_classes(options["classes"], reader.names(**own), title)


#: options that change how rows look, not which rows there are nor their labels
_LOOKS = ("invert", "upright")


@dataclass(frozen=True)
class Selection:
    """The rows that reader options keep, by label: ``labels`` of the label space that
    ``space`` names (the options that set labels, e.g. CIFAR-100's ``labels``)."""

    space: str
    labels: frozenset[int]


def selection(name: str, **options: Any) -> Selection | None:
    """Which rows of a dataset's files ``options`` keep (its ``classes``), to tell whether
    two readings of the same files share rows; None where every row is kept."""
    _, reader = _reader(name, "train", options)
    groups = _groups(reader, options)
    if groups is None:
        return None
    own = _own(reader, options)
    known = reader.names(**own)
    labels = frozenset(label for group in groups for label in group)
    if len(labels) == (known if isinstance(known, int) else len(known)):
        return None
    space = {k: v for k, v in own.items() if k not in ("classes", *_LOOKS)}
    return Selection(json_key(space), labels)


def _keep(
    groups: Groups, x: np.ndarray, y: np.ndarray, names: tuple[str, ...], ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray | None]:
    """The rows of the classes in ``groups``, relabelled 0..K-1 in their order."""
    new = lookup(groups, len(names))[y]
    mine = new >= 0
    kept = tuple("/".join(names[label] for label in group) for group in groups)
    return x[mine], new[mine], kept, None if ids is None else ids[mine]


def expected_files(name: str, split: str, **options: Any) -> list[Path]:
    """The files :func:`read_split` needs, relative to the root (torchvision's layout).

    idx files (MNIST, Fashion-MNIST, EMNIST) may also be present gzipped, as ``name.gz``.
    For FEMNIST this is the split's folder: every ``*.json`` shard in it is read.
    """
    _, reader = _reader(name, split, options)
    return reader.files(split, **_own(reader, options))


def present_files(
    name: str, root: str | Path, split: str, **options: Any
) -> tuple[list[Path], list[Path]]:
    """(files that :func:`read_split` would read, expected paths that are missing).

    Paths are under ``root``: an idx file's gzipped twin stands in for it; a folder of
    shards (FEMNIST) gives its matching files, sorted by name, or is missing if it has
    none (reported as ``folder/*.json``). Only looks at the file system; reads nothing.
    """
    root = Path(root)
    _, reader = _reader(name, split, options)
    found: list[Path] = []
    missing: list[Path] = []
    for rel in reader.files(split, **_own(reader, options)):
        path = root / rel
        if reader.pattern is not None:
            shards = _matching(path, reader.pattern)
            found += shards
            if not shards:
                missing.append(path / reader.pattern)
            continue
        if not path.is_file() and reader.gzip_ok and path.with_name(path.name + ".gz").is_file():
            path = path.with_name(path.name + ".gz")
        (found if path.is_file() else missing).append(path)
    return found, missing


def _matching(folder: Path, pattern: str) -> list[Path]:
    """Files in ``folder`` matching ``pattern``, sorted by name (none if it is no folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def read_split(name: str, root: str | Path, split: str, **options: Any) -> Split:
    """Read one official split of dataset ``name`` from ``root`` (see the module table).

    Options: EMNIST ``subset`` (balanced, byclass, bymerge, letters, digits, mnist;
    default balanced) and ``upright`` (default True); CIFAR-100 ``labels`` (fine or
    coarse); FEMNIST ``classes`` (all, digits, letters, uppercase, lowercase, or a list;
    default all) and ``invert`` (default True: MNIST's convention, ink high); every
    dataset ``classes``, a list of classes to keep (:mod:`fedkd.data.classes`). Raises
    :class:`ConfigError` on ``data.root`` naming every expected file when any is
    missing, and :class:`CorruptFileError` for a malformed file.
    """
    root = Path(root)
    key, reader = _reader(name, split, options)
    own = _own(reader, options)
    relative = reader.files(split, **own)
    if reader.pattern is not None:
        relative = [rel / reader.pattern for rel in relative]
    found, missing = present_files(key, root, split, **options)
    if missing:
        gz = " (the idx files may also be gzipped, with .gz appended)" if reader.gzip_ok else ""
        raise ConfigError(
            FIELD,
            f"{reader.title} {split} split not found in folder {root}: it needs "
            f"{', '.join(str(p) for p in relative)}{gz} in {reader.layout} under it, "
            f"and {', '.join(str(p.relative_to(root)) for p in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; {where_to_get(key)}, or "
            "point data.root at a folder that holds them.",
        )
    x, y, classes, *rest = reader.read(found, split, **own)
    groups = rest[0] if rest else None
    if reader.classes is None and "classes" in options and y is not None:
        keep = _groups(reader, options)
        assert keep is not None
        x, y, classes, groups = _keep(keep, x, y, tuple(classes), groups)
    source = root / reader.files(split, **own)[0] if reader.pattern else found[0].parent
    return Split(x, y, tuple(classes), source, tuple(found), groups)
