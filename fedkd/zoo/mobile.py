"""MobileNetV2 and ShuffleNetV2 for 32-pixel images (CIFAR variants)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.models import MODELS, StagedSequential
from fedkd.zoo.common import image_shape


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise - 1x1 linear projection, with a
    residual connection when the shape is kept (stride 1, same width)."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [_conv_bn(c_in, hidden), nn.ReLU6()]
        layers += [_conv_bn(hidden, hidden, 3, stride, hidden), nn.ReLU6(), _conv_bn(hidden, c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion, channels, blocks, stride); the second stage's stride is 1, not 2, for CIFAR
MOBILENETV2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@MODELS.register("mobilenetv2")
def mobilenetv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018, arXiv:1801.04381), width 1.0, for 32-pixel inputs.

    The paper's blocks (no projection shortcut where the width changes, ReLU6, as in
    torchvision) with the small-input strides of github.com/kuangliu/pytorch-cifar: stride 1
    in the stem and in the 24-channel stage, so 32x32 inputs end at 4x4. Global average
    pooling and a linear classifier, without dropout (2,236,682 parameters for 10 classes).
    Four stages, one per resolution (32, 16, 8, 4 pixels for 32-pixel inputs): a strided
    block opens the next; the last ends with the 1280-channel 1x1 convolution.
    """
    c, _, _ = image_shape("mobilenetv2", input_shape, 8)
    stages: list[list[nn.Module]] = [[_conv_bn(c, 32, 3), nn.ReLU6()]]
    c = 32
    for expansion, c_out, blocks, stride in MOBILENETV2:
        if stride != 1:
            stages.append([])
        for i in range(blocks):
            stages[-1].append(InvertedResidual(c, c_out, expansion, stride if i == 0 else 1))
            c = c_out
    stages[-1] += [_conv_bn(c, 1280), nn.ReLU6()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return StagedSequential.from_stages(stages, head)


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: half the channels pass through, the other half go through
    1x1 - 3x3 depthwise - 1x1; the halves are concatenated and shuffled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half), nn.ReLU(), _conv_bn(half, half, 3, 1, half), _conv_bn(half, half)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, rest = x.chunk(2, dim=1)
        return _shuffle(torch.cat([keep, F.relu(self.branch(rest))], 1))


class ShuffleDown(nn.Module):
    """ShuffleNetV2 downsampling unit: two strided branches, concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(_conv_bn(c_in, c_in, 3, 2, c_in), _conv_bn(c_in, mid))
        self.right = nn.Sequential(
            _conv_bn(c_in, mid), nn.ReLU(), _conv_bn(mid, mid, 3, 2, mid), _conv_bn(mid, mid)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shuffle(torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1))


# net_size -> (stage widths, final 1x1 width), Table 5 of the paper (kuangliu has 224 for 244)
SHUFFLENETV2 = {
    0.5: ((48, 96, 192), 1024),
    1.0: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2.0: ((244, 488, 976), 2048),
}


@MODELS.register("shufflenetv2")
def shufflenetv2(
    input_shape: tuple[int, ...], num_classes: int, net_size: float = 1.0
) -> nn.Module:
    """ShuffleNetV2 (Ma et al. 2018, arXiv:1807.11164) for 32-pixel inputs.

    As github.com/kuangliu/pytorch-cifar (``models/shufflenetv2.py``): a stride-1 3x3 stem
    (24) without max-pooling, three stages of a downsampling unit plus 3, 7 and 3 units,
    a 1x1 conv, global average pooling and a linear classifier (net_size 1: 1,263,854
    parameters for 10 classes). Four stages, one per resolution: the stem, then each
    downsampling unit with the units after it; the last ends with the 1x1 convolution.
    """
    if net_size not in SHUFFLENETV2:
        raise ValueError(f"shufflenetv2: net_size must be one of {sorted(SHUFFLENETV2)}")
    c, _, _ = image_shape("shufflenetv2", input_shape, 8)
    widths, final = SHUFFLENETV2[net_size]
    stages: list[list[nn.Module]] = [[_conv_bn(c, 24, 3), nn.ReLU()]]
    c = 24
    for width, units in zip(widths, (3, 7, 3), strict=True):
        stages.append([ShuffleDown(c, width), *(ShuffleBlock(width) for _ in range(units))])
        c = width
    stages[-1] += [_conv_bn(c, final), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(final, num_classes)]
    return StagedSequential.from_stages(stages, head)
