"""Model architectures by name, for students and teachers alike.

A model factory takes ``(input_shape, num_classes, **params)`` and returns an
``nn.Module`` mapping a batch of inputs to logits. Add your own with
``@MODELS.register("name")`` or name a factory / ``nn.Module`` subclass by import path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedkd.config import Spec
from fedkd.registry import Registry, bind_params

ModelFn = Callable[..., nn.Module]
MODELS: Registry[ModelFn] = Registry("model", check=callable, autoload="fedkd.zoo")


@MODELS.register("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on flattened inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, layers: int = 2
) -> nn.Module:
    """Fully connected ReLU network (MNIST-1D paper: 2 hidden layers of 100)."""
    dims = [math.prod(input_shape)] + [hidden] * layers
    blocks: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        blocks += [nn.Linear(d_in, d_out), nn.ReLU()]
    blocks.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*blocks)


class _AddChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


@MODELS.register("cnn1d")
def cnn1d(
    input_shape: tuple[int, ...], num_classes: int, channels: int = 25, kernel: int = 5
) -> nn.Module:
    """1-D CNN for sequences (MNIST-1D paper's ConvBase): three strided convolutions."""
    in_ch = 1 if len(input_shape) == 1 else input_shape[0]
    features = nn.Sequential(
        _AddChannel(),
        nn.Conv1d(in_ch, channels, kernel, stride=2, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(width, num_classes))


@MODELS.register("cnn2d")
def cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    """Small LeNet-style CNN for (C, H, W) images (MNIST, CIFAR-10)."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn2d needs (channels, height, width) inputs, got shape {input_shape}")
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, num_classes))


def check_model_spec(spec: Spec, path: str) -> None:
    """Fail on an unknown model name or parameter, naming the config field."""
    bind_params(MODELS.get(spec.name), spec.params, path, ("input_shape", "num_classes"))


def build_model(spec: Spec, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Instantiate ``spec`` with weights initialised from ``seed`` (not the global RNG)."""
    factory = MODELS.get(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(tuple(input_shape), num_classes, **spec.params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec.name!r} returned {type(model).__name__}, not an nn.Module")
    return model
