"""The Hugging Face image loader, on small datasets built locally in the same format."""

from __future__ import annotations

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")

from fedkd.config import ConfigError, load_config  # noqa: E402
from fedkd.data import DATASETS, build_federated_data  # noqa: E402


def _images(n: int, mode: str, size: int, seed: int) -> tuple[list, list[int]]:
    """Class c is an image whose brightness grows with c (learnable, like MNIST)."""
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    channels = 3 if mode == "RGB" else 1
    images = []
    for c in labels:
        arr = rng.integers(0, 25, (size, size, channels)) + 23 * c
        arr = arr.astype(np.uint8).squeeze()
        images.append(PIL.fromarray(arr, mode=mode))
    return images, labels


def _save(path, splits: dict[str, tuple[list, list[int]]]) -> str:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=features)
            for name, (imgs, labels) in splits.items()
        }
    )
    dd.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory) -> str:
    """An MNIST-format DatasetDict (train/test, 28x28 grayscale, ClassLabel) saved to disk."""
    path = tmp_path_factory.mktemp("hf") / "mnist"
    return _save(path, {"train": _images(120, "L", 28, 0), "test": _images(40, "L", 28, 1)})


def test_grayscale_splits_are_pooled_and_scaled(mnist_like):
    pool = DATASETS.get("hf")(150, seed=3, path=mnist_like)
    assert pool.x.shape == (150, 1, 28, 28) and pool.x.dtype == np.float32
    assert pool.x.min() >= 0.0 and pool.x.max() <= 1.0
    assert pool.num_classes == 10 and pool.y.dtype == np.int64
    again = DATASETS.get("hf")(150, seed=3, path=mnist_like)
    np.testing.assert_array_equal(pool.x, again.x)  # seeded draw


def test_rgb_images_become_channels_first(tmp_path):
    path = _save(tmp_path / "cifar", {"train": _images(30, "RGB", 32, 2)})
    pool = DATASETS.get("hf")(30, seed=0, path=path)
    assert pool.x.shape == (30, 3, 32, 32)


def test_too_few_samples_and_bad_columns_name_the_field(mnist_like):
    with pytest.raises(ConfigError, match="160 samples, 500 requested"):
        DATASETS.get("hf")(500, seed=0, path=mnist_like)
    with pytest.raises(ConfigError) as err:
        DATASETS.get("hf")(10, seed=0, path=mnist_like, label_column="digit")
    assert err.value.field == "data.dataset.label_column"


def test_federation_on_hf_data_with_an_image_cnn(mnist_like, tmp_path):
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(
        {
            "rounds": 2,
            "output_dir": str(tmp_path),
            "data": {
                "dataset": {"name": "hf", "path": mnist_like},
                "private": 100,
                "public": 30,
                "test": 30,
            },
            "partition": {"name": "iid"},
            "clients": {"count": 2, "models": ["cnn2d", "mlp"]},
            "server": {"teacher": "cnn2d"},
        }
    )
    data = build_federated_data(cfg)
    assert data.private_x.shape[1:] == (1, 28, 28)
    path = tmp_path / "data.npz"
    data.save(path)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert len(records) == 2 and records[-1].students.count == 2
