"""Normalisation and seeded augmentation (fedkd.data.transforms)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedkd.data.transforms import (
    AUGMENT_CHOICES,
    NORMALIZATION,
    Augment,
    augment_for,
    channel_stats,
    normalize,
    normalized_black,
    random_crop,
    random_hflip,
)

OFFICIAL = ("mnist", "fashion_mnist", "emnist", "femnist", "cifar10", "cifar100", "svhn", "stl10")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 6, c: int = 3, h: int = 7, w: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed))


# ----------------------------------------------------------------------------- normalisation


def test_every_official_dataset_has_statistics() -> None:
    assert set(NORMALIZATION) == set(OFFICIAL)
    for name, (mean, std) in NORMALIZATION.items():
        assert len(mean) == len(std) in (1, 3), name
        assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std), name
    from fedkd.data.datasets import OFFICIAL_SHAPES

    for name, shape in OFFICIAL_SHAPES.items():
        assert len(NORMALIZATION[name][0]) == shape[0], name


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn", "stl10"])
def test_normalize_standardises_data_with_the_published_stats(name: str) -> None:
    mean, std = NORMALIZATION[name]
    rng = np.random.default_rng(0)
    shape = (400, len(mean), 8, 8)
    x = rng.normal(np.array(mean)[:, None, None], np.array(std)[:, None, None], size=shape)
    x = x.astype(np.float32)
    before = x.copy()
    out = normalize(x, name)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out is not x and np.array_equal(x, before)  # a new array; input untouched
    m, s = channel_stats(out)
    np.testing.assert_allclose(m, 0.0, atol=0.02)
    np.testing.assert_allclose(s, 1.0, atol=0.02)


def test_normalize_is_exact_per_channel_and_accepts_other_spellings() -> None:
    x = np.zeros((2, 3, 2, 2), dtype=np.uint8)
    x[:, 1] = 1
    out = normalize(x, "CIFAR-10")
    (mr, mg, mb), (sr, sg, sb) = NORMALIZATION["cifar10"]
    np.testing.assert_allclose(out[:, 0], -mr / sr, rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], (1 - mg) / sg, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], -mb / sb, rtol=1e-6)
    assert normalize(np.zeros((1, 1, 2, 2)), "FashionMNIST").dtype == np.float32


def test_normalize_errors_name_the_dataset() -> None:
    with pytest.raises(ValueError, match="'mnist1d'.*known: mnist"):
        normalize(np.zeros((1, 1, 4, 4), np.float32), "mnist1d")
    with pytest.raises(ValueError, match=r"cifar10 has 3 channel\(s\).*\(2, 1, 4, 4\)"):
        normalize(np.zeros((2, 1, 4, 4), np.float32), "cifar10")
    with pytest.raises(ValueError, match="mnist has 1 channel"):
        normalize(np.zeros((4, 4), np.float32), "mnist")


def test_normalized_black_is_the_image_of_zero() -> None:
    black = normalized_black("svhn")
    out = normalize(np.zeros((1, 3, 1, 1), np.float32), "svhn")
    np.testing.assert_allclose(out[0, :, 0, 0], black, rtol=1e-6)


# ----------------------------------------------------------------------------- random_crop


def reference_crop(x: torch.Tensor, padding: int, top: int, left: int) -> torch.Tensor:
    """One sample, slowly: zero-pad, then the H x W window at (top, left)."""
    c, h, w = x.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:, padding : padding + h, padding : padding + w] = x
    return padded[:, top : top + h, left : left + w]


def window_offsets(x: torch.Tensor, out: torch.Tensor, padding: int) -> list[tuple[int, int]]:
    """For each sample, the (top, left) whose reference window equals the output."""
    span = 2 * padding + 1
    found = []
    for i in range(len(x)):
        hits = [
            (t, le)
            for t in range(span)
            for le in range(span)
            if torch.equal(reference_crop(x[i], padding, t, le), out[i])
        ]
        assert hits, f"sample {i} is no shifted window of the zero-padded input"
        found.append(hits[0])
    return found


def test_crop_is_a_shifted_window_of_the_padded_input() -> None:
    x = batch() + 0.5  # no zeros in the image, so every window is distinct
    before = x.clone()
    out = random_crop(x, 2, gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before)  # input untouched
    window_offsets(x, out, 2)


def test_crop_offsets_cover_every_position() -> None:
    p = 2
    x = (torch.arange(16, dtype=torch.float32) + 1).view(1, 1, 4, 4).repeat(300, 1, 1, 1)
    out = random_crop(x, p, gen(7))
    seen = window_offsets(x, out, p)
    assert set(seen) == {(t, le) for t in range(2 * p + 1) for le in range(2 * p + 1)}
    # each of the 25 offsets is roughly equally likely (300 draws: 12 expected)
    counts = np.bincount([t * 5 + le for t, le in seen], minlength=25)
    assert counts.min() >= 2 and counts.max() <= 30


def test_crop_is_seeded_by_the_generator() -> None:
    x = batch(n=32)
    a = random_crop(x, 4, gen(11))
    assert torch.equal(a, random_crop(x, 4, gen(11)))
    assert not torch.equal(a, random_crop(x, 4, gen(12)))
    state = torch.random.get_rng_state()
    random_crop(x, 4, gen(11))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not used


def test_crop_fill_per_channel() -> None:
    x = torch.ones(50, 3, 4, 4)
    out = random_crop(x, 3, gen(0), fill=(-1.0, -2.0, -3.0))
    padded = out != 1  # what came from the padding
    assert padded.any()
    for ch, value in enumerate((-1.0, -2.0, -3.0)):
        assert torch.all(out[:, ch][padded[:, ch]] == value)
    assert torch.all(random_crop(x, 3, gen(0), fill=0.25)[padded] == 0.25)
    with pytest.raises(ValueError, match="fill has 2 values, the batch has 3"):
        random_crop(x, 1, gen(0), fill=(0.0, 0.0))


def test_crop_zero_padding_and_bad_arguments() -> None:
    x = batch()
    g = gen(0)
    state = g.get_state()
    out = random_crop(x, 0, g)
    assert torch.equal(out, x) and out is not x
    assert torch.equal(g.get_state(), state)  # nothing drawn
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1, g)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_crop(x[0], 2, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
def test_augmentation_keeps_dtype(dtype: torch.dtype) -> None:
    x = (batch() * 200).to(dtype)
    for out in (random_crop(x, 2, gen(0)), random_hflip(x, gen(0))):
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_with_a_cpu_generator() -> None:
    x = batch(n=16)
    aug = Augment(crop=2, flip=True)
    out = aug(x.cuda(), gen(5))
    assert out.device.type == "cuda" and out.dtype == x.dtype
    assert torch.equal(out.cpu(), aug(x, gen(5)))  # same draws, same result as on CPU


# ----------------------------------------------------------------------------- random_hflip


def test_hflip_mirrors_about_half_exactly() -> None:
    x = batch(n=400, c=2, h=3, w=5)
    out = random_hflip(x, gen(2))
    mirrored = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x, strict=True)])
    assert bool((mirrored ^ kept).all())  # each sample is exactly one of the two
    assert 160 <= int(mirrored.sum()) <= 240
    assert torch.equal(out, random_hflip(x, gen(2)))
    assert not torch.equal(out, random_hflip(x, gen(3)))


def test_hflip_probability_bounds() -> None:
    x = batch()
    assert torch.equal(random_hflip(x, gen(0), p=0.0), x)
    assert torch.equal(random_hflip(x, gen(0), p=1.0), x.flip(-1))
    with pytest.raises(ValueError, match="p must be in"):
        random_hflip(x, gen(0), p=1.5)


# ----------------------------------------------------------------------------- Augment


def test_empty_augment_is_falsy_identity_and_draws_nothing() -> None:
    aug = Augment()
    assert not aug and aug.describe() == "none"
    x = batch()
    g = gen(0)
    state = g.get_state()
    assert aug(x, g) is x
    assert torch.equal(g.get_state(), state)


def test_augment_composes_crop_then_flip() -> None:
    x = batch(n=20)
    aug = Augment(crop=4, flip=True)
    assert aug and aug.describe() == "crop(pad 4) + hflip"
    g = gen(9)
    expected = random_hflip(random_crop(x, 4, g), g)
    assert torch.equal(aug(x, gen(9)), expected)
    assert Augment(flip=True).describe() == "hflip"
    assert Augment(crop=2).describe() == "crop(pad 2)"


def test_augment_records_round_trip_and_validation() -> None:
    aug = Augment(crop=4, flip=True, fill=[-1.0, -2.0, -3.0])
    assert aug.fill == (-1.0, -2.0, -3.0)
    assert aug.to_dict() == {"crop": 4, "flip": True, "fill": [-1.0, -2.0, -3.0]}
    assert Augment.from_dict(aug.to_dict()) == aug
    assert Augment.from_dict(Augment().to_dict()) == Augment()
    assert "fill" in aug.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        aug.crop = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="crop"):
        Augment(crop=-1)
    with pytest.raises(ValueError, match="flip"):
        Augment(flip=1)  # type: ignore[arg-type]


def test_augment_with_normalized_black_fill() -> None:
    black = normalized_black("cifar10")
    aug = dataclasses.replace(augment_for("cifar10"), fill=black)
    x = torch.from_numpy(normalize(np.full((30, 3, 8, 8), 0.5, np.float32), "cifar10"))
    out = aug(x, gen(0))
    for ch in range(3):
        image, pad = x[0, ch, 0, 0], torch.tensor(black[ch], dtype=torch.float32)
        values = out[:, ch]
        assert bool((values == image).any()) and bool((values == pad).any())
        assert bool(((values == image) | (values == pad)).all())


# ----------------------------------------------------------------------------- augment_for


@pytest.mark.parametrize(
    ("dataset", "crop", "flip"),
    [
        ("cifar10", 4, True),
        ("cifar100", 4, True),
        ("stl10", 12, True),
        ("svhn", 4, False),  # mirrored digits are other glyphs
        ("mnist", 0, False),
        ("fashion_mnist", 0, False),
        ("emnist", 0, False),
        ("femnist", 0, False),
        ("mnist1d", 0, False),
        ("digits", 0, False),
        ("synthetic", 0, False),
        ("hf", 0, False),
        ("CIFAR-10", 4, True),
    ],
)
def test_augment_for_auto(dataset: str, crop: int, flip: bool) -> None:
    assert augment_for(dataset) == Augment(crop=crop, flip=flip)
    assert augment_for(dataset, True) == augment_for(dataset, "auto")
    assert not augment_for(dataset, "none") and not augment_for(dataset, False)


def test_augment_for_explicit_settings() -> None:
    assert augment_for("svhn", "crop+flip") == Augment(crop=4, flip=True)
    assert augment_for("stl10", "crop") == Augment(crop=12)
    assert augment_for("cifar10", "flip") == Augment(flip=True)
    assert augment_for("mnist", "crop") == Augment(crop=4)  # 4 when no default padding
    assert augment_for("mnist1d", "Flip+Crop") == Augment(crop=4, flip=True)
    assert set(AUGMENT_CHOICES) == {"auto", "none", "crop", "flip", "crop+flip"}
    with pytest.raises(ValueError, match="auto, none, crop, flip, crop\\+flip"):
        augment_for("cifar10", "rotate")
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_for("cifar10", 1)  # type: ignore[arg-type]
