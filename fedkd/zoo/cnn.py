"""Small CNNs: LeNet-5 and FedMD's 2- and 3-layer CNNs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.models import MODELS, StagedSequential
from fedkd.zoo.common import flat_width, image_shape


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document recognition").

    The common modern variant: conv 5x5 (6) - max-pool - conv 5x5 (16, fully connected to
    all 6 maps, unlike the paper's C3) - max-pool - fc 120 - fc 84 - fc ``num_classes``,
    ReLU throughout. Inputs under 32 pixels (MNIST's 28) get the first convolution padded
    by 2, as the paper padded MNIST to 32x32. Stages: the two conv-pool blocks.
    """
    c, h, w = image_shape("lenet5", input_shape, 12)
    stages = [
        [nn.Conv2d(c, 6, 5, padding=2 if min(h, w) < 32 else 0), nn.ReLU(), nn.MaxPool2d(2)],
        [nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)],
    ]
    width = flat_width("lenet5", stages, input_shape)
    head = [
        nn.Flatten(),
        nn.Linear(width, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    ]
    return StagedSequential.from_stages(stages, head)


class _SameAvgPool(nn.Module):
    """Keras ``AveragePooling2D(2, strides=1, padding="same")``: pads right and bottom,
    averaging over the real pixels only, so the size is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False)[:, :, 1:, 1:]


def _block(c_in: int, c_out: int, kernel: int, stride: int, padding: int, p: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Dropout(p),
    )


@MODELS.register("fedmd_cnn2")
def fedmd_cnn2(
    input_shape: tuple[int, ...],
    num_classes: int,
    n1: int = 128,
    n2: int = 256,
    dropout_rate: float = 0.2,
) -> nn.Module:
    """FedMD's 2-layer CNN (Li & Wang 2019, arXiv:1910.03581).

    ``cnn_2layer_fc_model`` of the reference code (github.com/diogenes0319/FedMD_clean,
    ``Neural_Networks.py``): conv 3x3 same (n1)-BN-ReLU-dropout-avgpool 2 (stride 1, same),
    conv 3x3 stride 2 valid (n2)-BN-ReLU-dropout, then a bias-free linear layer. Defaults
    are the first model of the paper's list (``conf/CIFAR_balance_conf.json``: n1=128,
    n2=256, dropout 0.2). Stages: the first block with its pooling, the second block.
    """
    c, _, _ = image_shape("fedmd_cnn2", input_shape, 3)
    stages = [
        [*_block(c, n1, 3, 1, 1, dropout_rate), _SameAvgPool()],
        [*_block(n1, n2, 3, 2, 0, dropout_rate)],
    ]
    width = flat_width("fedmd_cnn2", stages, input_shape)
    return StagedSequential.from_stages(
        stages, [nn.Flatten(), nn.Linear(width, num_classes, bias=False)]
    )


@MODELS.register("fedmd_cnn3")
def fedmd_cnn3(
    input_shape: tuple[int, ...],
    num_classes: int,
    n1: int = 64,
    n2: int = 128,
    n3: int = 256,
    dropout_rate: float = 0.2,
) -> nn.Module:
    """FedMD's 3-layer CNN (Li & Wang 2019, arXiv:1910.03581).

    ``cnn_3layer_fc_model`` of the reference code (github.com/diogenes0319/FedMD_clean):
    conv 3x3 same (n1)-BN-ReLU-dropout-avgpool 2 (stride 1, same), conv 2x2 stride 2 (n2)-
    BN-ReLU-dropout-avgpool 2 (stride 2), conv 3x3 stride 2 valid (n3)-BN-ReLU-dropout,
    then a bias-free linear layer. Defaults are the first 3-layer model of the paper's
    list (``conf/CIFAR_balance_conf.json``: n1=64, n2=128, n3=256, dropout 0.2).
    Stages: each block with the pooling that follows it.
    """
    c, _, _ = image_shape("fedmd_cnn3", input_shape, 12)
    stages = [
        [*_block(c, n1, 3, 1, 1, dropout_rate), _SameAvgPool()],
        [*_block(n1, n2, 2, 2, 0, dropout_rate), nn.AvgPool2d(2)],
        [*_block(n2, n3, 3, 2, 0, dropout_rate)],
    ]
    width = flat_width("fedmd_cnn3", stages, input_shape)
    return StagedSequential.from_stages(
        stages, [nn.Flatten(), nn.Linear(width, num_classes, bias=False)]
    )
