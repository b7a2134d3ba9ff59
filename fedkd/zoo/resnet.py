"""CIFAR ResNets (He et al. 2016, Section 4.2) with BatchNorm or GroupNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.models import MODELS
from fedkd.zoo.common import image_shape

Norm = Callable[[int], nn.Module]
WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option A shortcut: identity subsampled by ``stride``, zero-padded to ``c_out``
    channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = (c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad)) if any(self.pad) else x


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers and a shortcut: option A (zero-padded identity) or, where
    the shape changes, option B (1x1 conv + norm projection)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Norm, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = ShortcutA(c_in, c_out, stride)
        if shortcut == "B" and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for small images: a 3x3 conv (16), three stages of
    n = (depth - 2) / 6 basic blocks at 16/32/64 channels (stride 2 between stages),
    global average pooling and a linear classifier.

    Follows He et al. 2016 (arXiv:1512.03385), Section 4.2: ``shortcut="A"`` (default)
    is the paper's parameter-free option A, with Kaiming-normal initialisation as in
    github.com/akamaster/pytorch_resnet_cifar10 (ResNet-20: 269,722 parameters, ResNet-32:
    464,154); ``"B"`` projects with 1x1 conv + norm where the shape changes, as FedDF's code
    (github.com/epfml/federated-learning-public-code) does (ResNet-8: 78,042, ResNet-20:
    272,474).

    :meth:`forward_features` gives the three stages (the stem with the 16-channel blocks,
    then the 32- and 64-channel blocks), the pooled embedding and the logits.
    """

    def __init__(
        self, depth: int, in_channels: int, num_classes: int, norm: Norm, shortcut: str = "A"
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CIFAR ResNet shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.blocks_per_stage = n
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = norm(WIDTHS[0])
        blocks: list[nn.Module] = []
        c_in = WIDTHS[0]
        for stage, c_out in enumerate(WIDTHS):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage and not i else 1, norm, shortcut))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(self.pool(out).flatten(1))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``stage1``-``stage3``, ``embedding`` and ``logits`` of one pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        feats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.layers, 1):
            out = block(out)
            if i % self.blocks_per_stage == 0:
                feats[f"stage{i // self.blocks_per_stage}"] = out
        feats["embedding"] = self.pool(out).flatten(1)
        feats["logits"] = self.linear(feats["embedding"])
        return feats


def _resnet(
    name: str,
    depth: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    groups: int | None,
    shortcut: str,
) -> nn.Module:
    c, _, _ = image_shape(name, input_shape, 4)
    if shortcut not in ("A", "B"):
        raise ValueError(f"{name}: shortcut must be 'A' or 'B', got {shortcut!r}")
    if groups is None:
        return CifarResNet(depth, c, num_classes, nn.BatchNorm2d, shortcut)
    if groups < 1 or WIDTHS[0] % groups:
        raise ValueError(f"{name}: groups must divide {WIDTHS[0]}, got {groups}")
    return CifarResNet(depth, c, num_classes, lambda ch: nn.GroupNorm(groups, ch), shortcut)


@MODELS.register("resnet8")
def resnet8(input_shape: tuple[int, ...], num_classes: int, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-8 with BatchNorm (see :class:`CifarResNet`)."""
    return _resnet("resnet8", 8, input_shape, num_classes, None, shortcut)


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-20 with BatchNorm (see :class:`CifarResNet`)."""
    return _resnet("resnet20", 20, input_shape, num_classes, None, shortcut)


@MODELS.register("resnet32")
def resnet32(input_shape: tuple[int, ...], num_classes: int, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-32 with BatchNorm (see :class:`CifarResNet`)."""
    return _resnet("resnet32", 32, input_shape, num_classes, None, shortcut)


# GroupNorm in place of BatchNorm, 2 groups by default: Hsieh et al. 2020 (arXiv:1910.00189)
# and FedDF's GN variants (Lin et al. 2020)


@MODELS.register("resnet8_gn")
def resnet8_gn(
    input_shape: tuple[int, ...], num_classes: int, groups: int = 2, shortcut: str = "A"
) -> nn.Module:
    """CIFAR ResNet-8 with GroupNorm of ``groups`` groups instead of BatchNorm."""
    return _resnet("resnet8_gn", 8, input_shape, num_classes, groups, shortcut)


@MODELS.register("resnet20_gn")
def resnet20_gn(
    input_shape: tuple[int, ...], num_classes: int, groups: int = 2, shortcut: str = "A"
) -> nn.Module:
    """CIFAR ResNet-20 with GroupNorm of ``groups`` groups instead of BatchNorm."""
    return _resnet("resnet20_gn", 20, input_shape, num_classes, groups, shortcut)


@MODELS.register("resnet32_gn")
def resnet32_gn(
    input_shape: tuple[int, ...], num_classes: int, groups: int = 2, shortcut: str = "A"
) -> nn.Module:
    """CIFAR ResNet-32 with GroupNorm of ``groups`` groups instead of BatchNorm."""
    return _resnet("resnet32_gn", 32, input_shape, num_classes, groups, shortcut)
