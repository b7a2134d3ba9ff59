"""Per-dataset normalisation and seeded train-time augmentation, as pure functions.

Normalisation (:func:`normalize`) works on the float32 arrays in [0, 1] shaped
(N, C, H, W) that :mod:`fedkd.data.readers` returns, with the published per-channel
mean and std of each official dataset (:data:`NORMALIZATION`). Offline generated
datasets (mnist1d, digits, synthetic, hf) have no entry and are left as they are.

Augmentation (:func:`random_crop`, :func:`random_hflip`, :class:`Augment`) works on
torch batches (N, C, H, W), vectorised over the batch, and draws every random number
from an explicit :class:`torch.Generator` (never the global RNG), so a run is
reproducible under Ray. The number of draws depends only on the batch size, not on the
data. A caller that wants the batch order of a run to be the same with and without
augmentation should give augmentation a generator of its own.

Order and padding: our pipeline normalises first and augments the normalised batch, so
:func:`random_crop` pads with ``fill = 0.0`` by default, which is the dataset's *mean
colour*. torchvision's ``RandomCrop(size, padding=4)`` pads the raw image with 0
(*black*) before ``Normalize``; to reproduce that exactly, pass
``fill=normalized_black(dataset)`` (``-mean / std`` per channel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkd.config import AUGMENT_CHOICES

if TYPE_CHECKING:
    from fedkd.config import DataConfig

__all__ = [
    "AUGMENT_CHOICES",
    "NORMALIZATION",
    "Augment",
    "augment_for",
    "canonical_name",
    "channel_stats",
    "normalize",
    "normalized_black",
    "random_crop",
    "random_hflip",
    "train_augment",
]

#: per-channel (mean, std) of each official dataset, on pixel values scaled to [0, 1].
#: Convention: the statistics of every pixel of the official *training* split pooled
#: per channel (``x.mean(axis=(0, 2, 3))``, ``x.std(axis=(0, 2, 3))``). Some repositories
#: use CIFAR-10 std (0.2023, 0.1994, 0.2010) instead (kuangliu/pytorch-cifar and its many
#: copies): that is the *average of per-image* stds, which is smaller; it is not used here.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # pytorch/examples mnist/main.py, Normalize((0.1307,), (0.3081,)); the train split's
    # pooled mean/std 33.31/255, 78.57/255 (discuss.pytorch.org t/95218)
    "mnist": ((0.1307,), (0.3081,)),
    # chatflip/CalculationMeanStd README, FashionMNIST(train): 0.2860 / 0.3530
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # EMNIST *balanced* subset (the readers' default): limyunkai19/learn-it-fast
    # datasets/emnist.py, Normalize((0.1751,), (0.3332,)); lightning-bolts
    # emnist_normalization("balanced") rounds it to (0.175, 0.333). Other subsets differ in
    # the third decimal (byclass/bymerge 0.174/0.332, letters 0.172/0.331, lightning-bolts).
    "emnist": ((0.1751,), (0.3332,)),
    # FEMNIST: not measured. MNIST's values, which assume MNIST polarity (ink bright on a
    # dark background). LEAF's femnist preprocessing (data/femnist/preprocess/
    # data_to_json.py) keeps NIST SD19's dark ink on a *white* background (background
    # = 1.0): data in that polarity must be inverted (1 - x) first, or measured with
    # :func:`channel_stats`.
    "femnist": ((0.1307,), (0.3081,)),
    # pooled train-split stats, e.g. kuangliu/pytorch-cifar issue #8/#129 and
    # bmsookim/wide-resnet.pytorch issue #15 (0.4914, 0.4822, 0.4465)/(0.2470, 0.2435, 0.2616);
    # = fb.resnet.torch's (125.3, 123.0, 113.9)/(63.0, 62.1, 66.7) divided by 255
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # pooled train-split stats (weiaicunzai's gist "CIFAR-100 mean and std", also
    # NX-AI/vision-lstm cifar100_norm.py std (0.2673, 0.2564, 0.2762)); some repos round
    # differently: (0.5071, 0.4867, 0.4408)/(0.2675, 0.2565, 0.2761)
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # train split (not extra): PatrickZH/DeepCore deepcore/datasets/svhn.py; unrounded
    # (0.4376821, 0.4437697, 0.4728044)/(0.19803012, 0.20101562, 0.19703614) elsewhere
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # labelled train split (5,000 images), widely copied (e.g. "values for labeled train
    # set: mean [0.4469, 0.4400, 0.4069], std [0.2603, 0.2566, 0.2713]" in public code);
    # not the unlabeled split's
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

#: crop padding of each dataset's default augmentation (0: no crop); 12 for STL-10 is
#: 96 / 8, the same 12.5 % of the side as 4 px on 32 x 32 (FixMatch's
#: ``padding=int(size * 0.125)``)
_CROP_PADDING: dict[str, int] = {"cifar10": 4, "cifar100": 4, "svhn": 4, "stl10": 12}
#: datasets whose default augmentation flips horizontally (not digits or characters)
_FLIP: frozenset[str] = frozenset({"cifar10", "cifar100", "stl10"})

#: values :func:`augment_for` accepts for ``setting`` (besides True and False): the
#: config's ``data.augment`` choices


def canonical_name(dataset: str) -> str:
    """``dataset`` as a key of :data:`NORMALIZATION` when it names an official dataset
    (case, ``-`` and ``_`` ignored, as in :mod:`fedkd.data.readers`), else unchanged."""
    key = dataset.lower().replace("-", "").replace("_", "")
    return {k.replace("_", ""): k for k in NORMALIZATION}.get(key, dataset)


def _stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    key = canonical_name(dataset)
    if key not in NORMALIZATION:
        raise ValueError(
            f"no normalisation statistics for dataset {dataset!r}; "
            f"known: {', '.join(NORMALIZATION)}"
        )
    return NORMALIZATION[key]


def normalize(x: np.ndarray, dataset: str) -> np.ndarray:
    """``(x - mean) / std`` per channel with ``dataset``'s :data:`NORMALIZATION`.

    ``x`` is (..., C, H, W) (usually (N, C, H, W)) with values in [0, 1]. Returns a new
    float32 array; ``x`` is not modified. Raises ValueError naming the dataset when it
    has no statistics or when C is not its channel count.
    """
    mean, std = _stats(dataset)
    x = np.asarray(x)
    if x.ndim < 3 or x.shape[-3] != len(mean):
        raise ValueError(
            f"{dataset} has {len(mean)} channel(s): expected an array shaped "
            f"(N, {len(mean)}, H, W), got {x.shape}"
        )
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return ((x.astype(np.float32) - m) / s).astype(np.float32, copy=False)


def normalized_black(dataset: str) -> tuple[float, ...]:
    """The normalised value of a black pixel (``-mean / std`` per channel): the ``fill``
    that makes :func:`random_crop` on normalised data pad as torchvision does."""
    mean, std = _stats(dataset)
    return tuple(-m / s for m, s in zip(mean, std, strict=True))


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pooled per-channel (mean, std) of ``x`` shaped (N, C, H, W), the convention of
    :data:`NORMALIZATION` (population std, computed in float64)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected an array shaped (N, C, H, W), got {x.shape}")
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------- augmentation


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a tensor batch shaped (N, C, H, W), got {shape}")


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) from ``generator`` (on its own device), on ``device``."""
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def random_crop(
    x: torch.Tensor,
    padding: int,
    generator: torch.Generator,
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Pad each side by ``padding`` with ``fill``, then crop back to H x W at a random
    offset drawn per sample, uniform over the (2 * padding + 1) ** 2 positions.

    The same as torchvision's ``RandomCrop((H, W), padding=padding)`` per sample (the
    CIFAR recipe of He et al. 2016, §4.2: 4-pixel padding, random 32 x 32 crop). ``fill``
    is one value or one per channel; the default 0.0 is the mean colour on normalised
    data (see the module docstring; :func:`normalized_black` gives torchvision's black).
    Returns a new tensor of the same shape, dtype and device; ``x`` is not modified.
    Draws N offsets for each axis from ``generator``, which may be on another device
    than ``x``. ``padding = 0`` returns a copy and draws nothing.
    """
    _check_batch(x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    n, c, h, w = x.shape
    if isinstance(fill, (int, float)):
        values = [float(fill)] * c
    else:
        values = [float(v) for v in fill]
        if len(values) != c:
            raise ValueError(f"fill has {len(values)} values, the batch has {c} channel(s)")
    if padding == 0:
        return x.clone()
    p = padding
    padded = torch.tensor(values, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded = padded.repeat(n, 1, h + 2 * p, w + 2 * p)
    padded[:, :, p : p + h, p : p + w] = x
    span = 2 * p + 1
    top = torch.randint(span, (n,), generator=generator, device=generator.device).to(x.device)
    left = torch.randint(span, (n,), generator=generator, device=generator.device).to(x.device)
    # two gathers (rows, then columns) pick each sample's window without a loop over samples
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``, drawn per sample (as
    torchvision's ``RandomHorizontalFlip(p)``: flipped when a uniform draw is < p).

    Returns a new tensor of the same shape, dtype and device; draws N uniforms from
    ``generator``, which may be on another device than ``x``.
    """
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    flip = _uniform(len(x), generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation: random crop with ``crop`` pixels of padding (0: none),
    then a random horizontal flip if ``flip``; ``fill`` is the crop's padding value
    (see :func:`random_crop`).

    ``aug(x, generator)`` returns the augmented batch; an augmentation that does
    nothing (``Augment()``, falsy) returns ``x`` itself and draws nothing.
    """

    crop: int = 0
    flip: bool = False
    fill: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 0:
            raise ValueError(f"crop must be an int >= 0 (padding in pixels), got {self.crop!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be a bool, got {self.flip!r}")
        fill = self.fill
        if isinstance(fill, bool):
            raise ValueError(f"fill must be a number or one number per channel, got {fill!r}")
        if isinstance(fill, (int, float)):
            object.__setattr__(self, "fill", float(fill))
        else:
            try:
                values = tuple(float(v) for v in fill)
            except (TypeError, ValueError):
                raise ValueError(
                    f"fill must be a number or one number per channel, got {fill!r}"
                ) from None
            object.__setattr__(self, "fill", values)

    def __bool__(self) -> bool:
        return self.crop > 0 or self.flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop:
            x = random_crop(x, self.crop, generator, self.fill)
        if self.flip:
            x = random_hflip(x, generator)
        return x

    def bound(self, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """This augmentation as a batch -> batch function drawing from ``generator``, for
        the training loops; None when it does nothing."""
        if not self:
            return None
        return lambda x: self(x, generator)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for records: ``{"crop": 4, "flip": True, "fill": 0.0}``."""
        fill = list(self.fill) if isinstance(self.fill, tuple) else self.fill
        return {"crop": self.crop, "flip": self.flip, "fill": fill}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Augment:
        """The inverse of :meth:`to_dict`."""
        fill = data.get("fill", 0.0)
        return cls(
            crop=data.get("crop", 0),
            flip=data.get("flip", False),
            fill=tuple(fill) if isinstance(fill, (list, tuple)) else fill,
        )

    def describe(self) -> str:
        """Short text: ``"crop(pad 4) + hflip"``, ``"hflip"``, ``"none"``..."""
        parts = []
        if self.crop:
            if self.fill == 0.0:
                parts.append(f"crop(pad {self.crop})")
            else:
                fill = self.fill if isinstance(self.fill, float) else list(self.fill)
                parts.append(f"crop(pad {self.crop}, fill {fill})")
        if self.flip:
            parts.append("hflip")
        return " + ".join(parts) or "none"


def augment_for(dataset: str, setting: str | bool = "auto") -> Augment:
    """The augmentation ``setting`` means for ``dataset``.

    ``"auto"`` / True: the dataset's usual recipe. CIFAR-10, CIFAR-100: 4-pixel padding,
    random crop, horizontal flip (He et al. 2016, §4.2, followed by most FL/KD papers);
    STL-10 (96 x 96): the same with 12-pixel padding (96 / 8, the ratio of 4 on 32 x 32;
    FixMatch pads by 12.5 % of the side). SVHN: crop with 4-pixel padding but *no flip*:
    mirrored digits are other glyphs or no digit at all (2, 3, 4, 5, 7, ...), so SVHN
    recipes (e.g. FixMatch, Sohn et al. 2020) do not flip. The MNIST family (mnist,
    fashion_mnist, emnist, femnist) and every non-official dataset (mnist1d, digits,
    synthetic, hf, ...): none.

    ``"none"`` / False: none. ``"crop"``, ``"flip"``, ``"crop+flip"``: those, whatever the
    dataset (crop with the dataset's default padding, 4 if it has none). Raises
    ValueError for any other setting, listing the choices.
    """
    if isinstance(setting, bool):
        choice = "auto" if setting else "none"
    elif isinstance(setting, str):
        choice = setting.strip().lower().replace(" ", "")
        if choice == "flip+crop":
            choice = "crop+flip"
    else:
        choice = None
    if choice not in AUGMENT_CHOICES:
        raise ValueError(
            f"unknown augmentation {setting!r}; choose one of {', '.join(AUGMENT_CHOICES)} "
            "(or true / false)"
        )
    key = canonical_name(dataset)
    padding = _CROP_PADDING.get(key, 0)
    if choice == "auto":
        return Augment(crop=padding, flip=key in _FLIP)
    if choice == "none":
        return Augment()
    return Augment(
        crop=(padding or 4) if "crop" in choice else 0,
        flip="flip" in choice,
    )


def train_augment(data: DataConfig) -> Augment:
    """The augmentation of a run's private training batches (``data.augment`` for
    ``data.dataset``). Where the data are normalised, the crop pads with the normalised
    value of black, so a padded border is what torchvision's ``RandomCrop(padding)``
    before ``Normalize`` gives."""
    aug = augment_for(data.dataset.name, data.augment)
    key = canonical_name(data.dataset.name)
    if aug.crop and data.normalize and data.official and key in NORMALIZATION:
        aug = replace(aug, fill=normalized_black(key))
    return aug
