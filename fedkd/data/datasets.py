"""Sample pools by name: offline generators and a loader for Hugging Face datasets.

A dataset function takes the number of samples wanted and a seed and returns a
:class:`Pool`; fedkd then carves disjoint private / public / test splits from it.
Register your own with ``@DATASETS.register("name")`` or name it by import path.

Two optional attributes let fedkd reject a bad config before generating anything:
``max_samples`` (an int, or a function of the dataset's parameters returning an int
or None for "no limit") is how many samples the dataset can provide, and
``precheck(**params)`` raises :class:`~fedkd.config.ConfigError` for parameter values
that cannot work. Both get every parameter, defaults filled in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import ConfigError, check_value
from fedkd.registry import Registry


@dataclass(frozen=True)
class Pool:
    """Labelled samples: ``x`` float32 of shape (N, *input_shape), ``y`` int64 in [0, C)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


DatasetFn = Callable[..., Pool]
DATASETS: Registry[DatasetFn] = Registry("dataset", check=callable, group="fedkd.datasets")


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int, seed: int, **overrides: Any) -> Pool:
    """MNIST-1D (Greydanus 2020), generated procedurally: no download.

    Keyword overrides go to ``mnist1d``'s generator arguments (e.g. ``iid_noise_scale``).
    Baselines from its paper on the full 4,000/1,000 split: logistic ~32%, MLP ~68%, CNN ~94%.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    _check_mnist1d(**overrides)
    args = get_dataset_args(as_dict=True)
    # The generator makes a multiple of 10 samples (one template per class): round up, trim.
    args.update(overrides, num_samples=-(-num_samples // 10) * 10, seed=seed, train_split=1.0)
    # make_dataset reseeds NumPy's and Python's global generators: keep the caller's.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(_View(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:num_samples]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)[:num_samples]
    return Pool(x, y, 10)


_MNIST1D_SET_BY_FEDKD = ("num_samples", "seed", "train_split", "url")


def _check_mnist1d(**overrides: Any) -> None:
    """Overrides must be mnist1d generator arguments of the default's type."""
    if not overrides:
        return
    from mnist1d.data import get_dataset_args

    args = {
        k: v for k, v in get_dataset_args(as_dict=True).items() if k not in _MNIST1D_SET_BY_FEDKD
    }
    for key, value in overrides.items():
        path = f"data.dataset.{key}"
        if key not in args:
            raise ConfigError(path, f"unknown; valid: {', '.join(args)}")
        default = args[key]
        if isinstance(default, int | float):  # bool too
            check_value(value, type(default), path, default)
        elif not isinstance(value, type(default)):
            raise ConfigError(
                path,
                f"expected a {type(default).__name__} like the default {default!r}, got {value!r}",
            )


mnist1d.precheck = _check_mnist1d  # type: ignore[attr-defined]


class _View(dict):
    """mnist1d wants attribute access to its arguments."""

    __getattr__ = dict.__getitem__


DIGITS_SAMPLES = 1797  # sklearn.datasets.load_digits: the whole data set


@DATASETS.register("digits")
def digits(num_samples: int, seed: int) -> Pool:
    """scikit-learn's 8x8 handwritten digits (1,797 samples, shipped inside the package)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return Pool(x, data.target.astype(np.int64), 10)


digits.max_samples = DIGITS_SAMPLES  # type: ignore[attr-defined]


@DATASETS.register("synthetic")
def synthetic(
    num_samples: int,
    seed: int,
    num_features: int = 20,
    num_classes: int = 10,
    informative: int = 10,
    class_sep: float = 1.0,
) -> Pool:
    """Gaussian clusters from scikit-learn's ``make_classification``, seeded."""
    from sklearn.datasets import make_classification

    _check_synthetic(num_features, num_classes, informative)
    x, y = make_classification(
        n_samples=num_samples,
        n_features=num_features,
        n_informative=informative,
        n_redundant=0,
        n_classes=num_classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        random_state=seed,
    )
    return Pool(x.astype(np.float32), y.astype(np.int64), num_classes)


def _check_synthetic(num_features: int, num_classes: int, informative: int, **_: Any) -> None:
    """What ``make_classification`` accepts, as errors that name the field."""
    if num_features < 1:
        raise ConfigError("data.dataset.num_features", f"must be >= 1, got {num_features}")
    if num_classes < 2:
        raise ConfigError("data.dataset.num_classes", f"must be >= 2, got {num_classes}")
    if not 1 <= informative <= num_features:
        raise ConfigError(
            "data.dataset.informative",
            f"must be in 1..num_features={num_features}, got {informative}",
        )
    if num_classes > 2**informative:
        need = (num_classes - 1).bit_length()
        more = f" and data.dataset.num_features >= {need}" if need > num_features else ""
        raise ConfigError(
            "data.dataset.informative",
            f"{informative} informative features separate at most {2**informative} classes, "
            f"not num_classes={num_classes}; use data.dataset.informative >= {need}{more} "
            "or fewer data.dataset.num_classes",
        )


synthetic.precheck = _check_synthetic  # type: ignore[attr-defined]


@DATASETS.register("hf")
def huggingface(
    num_samples: int,
    seed: int,
    path: str = "mnist",
    subset: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
) -> Pool:
    """An image-classification dataset from the Hugging Face Hub or a local copy.

    ``path`` is a Hub name (``"mnist"``, ``"uoft-cs/cifar10"``) loaded with
    ``datasets.load_dataset``, or a directory written by ``Dataset.save_to_disk``.
    All splits are pooled, ``num_samples`` are drawn with ``seed``, and images become
    float32 arrays in [0, 1] shaped (channels, height, width).
    """
    import datasets

    if Path(path).exists():
        ds = datasets.load_from_disk(path)
    else:  # needs network access on first use; cached by `datasets` afterwards
        ds = datasets.load_dataset(path, subset)
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
    if label_column not in ds.column_names:
        raise ConfigError("data.dataset.label_column", f"{label_column!r} not in {ds.column_names}")
    image_column = image_column or _find_image_column(ds, label_column)
    if len(ds) < num_samples:
        raise ConfigError("data", f"{path!r} has {len(ds)} samples, {num_samples} requested")
    pick = np.random.default_rng(seed).permutation(len(ds))[:num_samples]
    ds = ds.select(np.sort(pick))
    label_feature = ds.features[label_column]
    labels = np.asarray(ds[label_column], dtype=np.int64)
    num_classes = getattr(label_feature, "num_classes", None) or int(labels.max()) + 1
    images = np.stack([_image_array(img) for img in ds[image_column]])
    return Pool(images, labels, num_classes)


def _find_image_column(ds: Any, label_column: str) -> str:
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    others = [c for c in ds.column_names if c != label_column]
    if len(others) != 1:
        raise ConfigError(
            "data.dataset.image_column", f"cannot tell which of {others} holds images"
        )
    return others[0]


def _image_array(image: Any) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    if arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    if arr.ndim == 2:  # grayscale: add a channel axis
        return arr[None]
    return np.moveaxis(arr, -1, 0)  # HWC -> CHW


#: official datasets' input shapes, (channels, height, width), known without reading files
OFFICIAL_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "emnist": (1, 28, 28),
    "femnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "svhn": (3, 32, 32),
    "stl10": (3, 96, 96),
}


class OfficialDataset:
    """A dataset read from its official files (see :mod:`fedkd.data.readers`).

    fedkd builds a federation from its official splits (private and public rows from
    ``train``, the test set from ``test``; see :mod:`fedkd.data.prepare`). Called
    as a plain dataset function, it returns a seeded sample of one split.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.input_shape = OFFICIAL_SHAPES[name]
        self.__doc__ = f"{name}: read from its official files under data.root (official splits)"

    def __repr__(self) -> str:
        return f"OfficialDataset({self.name!r})"

    def __call__(
        self, num_samples: int, seed: int, root: str = "data", split: str = "train", **options: Any
    ) -> Pool:
        from fedkd.data.readers import read_split

        data = read_split(self.name, root, split, **options)
        if data.y is None:
            raise ConfigError("data.dataset", f"{self.name} {split} split has no labels")
        if num_samples > len(data.y):
            raise ConfigError(
                "data", f"{num_samples} samples requested, {self.name} {split} has {len(data.y)}"
            )
        rows = np.sort(np.random.default_rng(seed).permutation(len(data.y))[:num_samples])
        return Pool(data.x[rows], data.y[rows], data.num_classes)


for _name in OFFICIAL_SHAPES:
    DATASETS.register(_name)(OfficialDataset(_name))
