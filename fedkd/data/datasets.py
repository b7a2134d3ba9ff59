"""Sample pools by name: offline generators and a loader for Hugging Face datasets.

A dataset function takes the number of samples wanted and a seed and returns a
:class:`Pool`; fedkd then carves disjoint private / public / test splits from it.
Register your own with ``@DATASETS.register("name")`` or name it by import path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import ConfigError
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
DATASETS: Registry[DatasetFn] = Registry("dataset", check=callable)


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int, seed: int, **overrides: Any) -> Pool:
    """MNIST-1D (Greydanus 2020), generated procedurally: no download.

    Keyword overrides go to ``mnist1d``'s generator arguments (e.g. ``iid_noise_scale``).
    Baselines from its paper on the full 4,000/1,000 split: logistic ~32%, MLP ~68%, CNN ~94%.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    unknown = set(overrides) - set(args)
    if unknown:
        raise ConfigError(
            f"data.dataset.{sorted(unknown)[0]}", f"unknown; valid: {', '.join(args)}"
        )
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


class _View(dict):
    """mnist1d wants attribute access to its arguments."""

    __getattr__ = dict.__getitem__


@DATASETS.register("digits")
def digits(num_samples: int, seed: int) -> Pool:
    """scikit-learn's 8x8 handwritten digits (1,797 samples, shipped inside the package)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return Pool(x, data.target.astype(np.int64), 10)


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

    if informative > num_features:
        raise ConfigError(
            "data.dataset.informative", f"{informative} > num_features={num_features}"
        )
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
