"""VGG-9 (FedMA / FedDF) and a CIFAR VGG-11 with BatchNorm."""

from __future__ import annotations

from torch import nn

from fedkd.models import MODELS, StagedSequential
from fedkd.zoo.common import flat_width, image_shape


def _conv(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    norm: list[nn.Module] = [nn.BatchNorm2d(c_out)] if bn else []
    return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU()]


@MODELS.register("vgg9")
def vgg9(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-9 of FedMA (Wang et al. 2020, arXiv:2002.06440) and FedDF (Lin et al. 2020).

    ``ModerateCNN`` of the FedMA reference code (github.com/IBM/FedMA, ``model.py``):
    six 3x3 convolutions (32, 64 | 128, 128 | 256, 256, max-pool after each pair, no
    BatchNorm, 2-D dropout 0.05 after the second pair), then dropout 0.1 - fc 512 - fc 512 -
    dropout 0.1 - fc ``num_classes``. The first fc takes the flattened 4x4x256 maps of a
    32-pixel input (3,491,530 parameters for CIFAR-10); other sizes resize it. Stages: the
    three pairs of convolutions, each with its max-pool (the second with its dropout).
    """
    c, _, _ = image_shape("vgg9", input_shape, 8)
    stages = [
        [*_conv(c, 32, False), *_conv(32, 64, False), nn.MaxPool2d(2)],
        [*_conv(64, 128, False), *_conv(128, 128, False), nn.MaxPool2d(2), nn.Dropout2d(0.05)],
        [*_conv(128, 256, False), *_conv(256, 256, False), nn.MaxPool2d(2)],
    ]
    width = flat_width("vgg9", stages, input_shape)
    head = [
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(width, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(512, num_classes),
    ]
    return StagedSequential.from_stages(stages, head)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@MODELS.register("vgg11")
def vgg11(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-11 (configuration A of Simonyan & Zisserman 2015, arXiv:1409.1556), CIFAR variant.

    As in github.com/kuangliu/pytorch-cifar (``models/vgg.py``): every 3x3 convolution is
    followed by BatchNorm and ReLU, the three fully connected layers are replaced by one
    linear layer on the 512 pooled features (9,231,114 parameters for 10 classes).
    Max-pooling rounds up and a global average pool precedes the classifier, which changes
    nothing at 32 pixels and lets 28-pixel inputs through. Stages: the five groups of
    convolutions, each with the max-pool that closes it.
    """
    c, _, _ = image_shape("vgg11", input_shape, 8)
    stages: list[list[nn.Module]] = [[]]
    for v in VGG11:
        if v == "M":
            stages[-1].append(nn.MaxPool2d(2, ceil_mode=True))
            stages.append([])
        else:
            stages[-1] += _conv(c, int(v), True)
            c = int(v)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return StagedSequential.from_stages([s for s in stages if s], head)
